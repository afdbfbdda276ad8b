"""benchmarks/multi_gpu.py's table: a file joined from several invocations says which row came from
which, and a ratio uses the 1-GPU row of its own invocation where there is one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import multi_gpu  # noqa: E402

ENV = {"gpu": "GPU", "torch": "t", "transformers": "tf", "accelerate": "a", "batching": "packed rows",
       "data": "d", "model": "2b", "config": "qwen2_vl_2b_lora.yaml"}


def _row(run: str, gpus: int, tokens: float, invocation: str) -> dict:
    return {"run": run, "gpus": gpus, "returncode": 0, "compiled": True, "quant": "dynamic",
            "per_gpu_batch": "1 row(s)", "tokens_per_s_steady": tokens, "param_gib_per_gpu": [1.0] * gpus,
            "load_peak_mem_gib_per_gpu": [1.0] * gpus, "peak_mem_gib_per_gpu": [2.0] * gpus,
            "data_wait_share": 0.0, "steps": 4, "final_loss": 1.0, "invocation": invocation}


def test_rows_of_two_invocations_are_marked_and_compare_within_their_own(tmp_path):
    first = {**ENV, "invocations": {"inv-1": "multi_gpu.py --runs 1gpu,ddp2"}}
    multi_gpu.write([_row("1gpu", 1, 100.0, "inv-1"), _row("ddp2", 2, 190.0, "inv-1")], first, tmp_path, "t")
    second = {**ENV, "invocations": {"inv-2": "multi_gpu.py --runs 1gpu,fsdp2"}}
    multi_gpu.write([_row("1gpu", 1, 200.0, "inv-2"), _row("fsdp2", 2, 300.0, "inv-2")], second, tmp_path, "t")

    saved = json.loads((tmp_path / "t.json").read_text())
    assert set(saved["env"]["invocations"]) == {"inv-1", "inv-2"}   # the first invocation's command is kept
    md = (tmp_path / "t.md").read_text()
    assert "Rows from several invocations" in md and "multi_gpu.py --runs 1gpu,ddp2" in md
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    # the replaced 1gpu row is the second invocation's; ddp2 (first invocation) has no 1-GPU row of its own
    # left, so it compares with the latest 1-GPU row and says which invocation it came from
    assert "| 0.95 |" in lines["ddp2"] and lines["ddp2"].rstrip().endswith("| inv-1 |")
    assert "| 1.50 |" in lines["fsdp2"] and lines["fsdp2"].rstrip().endswith("| inv-2 |")


def test_one_invocation_has_no_joined_note(tmp_path):
    env = {**ENV, "invocations": {"inv-1": "multi_gpu.py"}}
    multi_gpu.write([_row("1gpu", 1, 100.0, "inv-1"), _row("ddp2", 2, 190.0, "inv-1")], env, tmp_path, "t")
    md = (tmp_path / "t.md").read_text()
    assert "several invocations" not in md and "| 1.90 |" in md
