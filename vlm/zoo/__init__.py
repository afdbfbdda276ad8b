"""Offline tiny-model zoo: small checkpoints of each real architecture."""
