"""Serving with vLLM: ``VllmServer`` (Python) and ``vlm serve`` (CLI)."""

from vlm.serve.plan import ServeError, plan_launch
from vlm.serve.server import VllmServer

__all__ = ["ServeError", "VllmServer", "plan_launch"]
