"""Exports: PEFT adapters, merged checkpoints, vLLM checks."""
