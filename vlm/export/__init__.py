"""Exports: vLLM checks for PEFT adapters (check.py) and merged 16-bit checkpoints (merge.py)."""

from vlm.export.check import AdapterRejected, CheckReport, Problem, check_adapter, require_servable, vllm_rules
from vlm.export.merge import export_merged, load_merged

__all__ = ["AdapterRejected", "CheckReport", "Problem", "check_adapter", "export_merged", "load_merged",
           "require_servable", "vllm_rules"]
