"""Serving with vLLM."""
