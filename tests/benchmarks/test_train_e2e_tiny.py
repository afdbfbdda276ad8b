"""benchmarks/train_e2e.py on CPU (--tiny): the real `vlm train` CLI and the transformers Trainer (+ PEFT)
baseline each run in their own process on the generated realistic data, for LoRA (2b_lora) and full
fine-tuning (2b_full), and every number of the table comes back."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .._concurrent import Run

REPO = Path(__file__).resolve().parents[2]


def test_tiny_rows_measure_and_learn_the_same_thing(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)   # CPU without the interpreter: vlm.kernels.patch steps aside
    # one invocation per model, started together (tests/_concurrent.py: CI's second core)
    runs = {m: Run([sys.executable, REPO / "benchmarks" / "train_e2e.py", "--tiny", "--device", "cpu",
                    "--out", tmp_path / m, "--steps", "5", "--warmup", "1", "--profile", "--models", m],
                   tmp_path / f"logs_{m}", env=env)
            for m in ("2b_lora", "2b_full")}
    try:
        done = {m: run.wait(timeout=900) for m, run in runs.items()}
    finally:
        for run in runs.values():
            run.stop()
    for m, r in done.items():
        assert r.returncode == 0, m + ": " + r.stdout[-3000:] + r.stderr[-3000:]
    r = done["2b_lora"]
    by_model = {m: {row["row"]: row for row in json.loads((tmp_path / m / "train_e2e_tiny.json").read_text())["rows"]
                    if row["model"] == m} for m in ("2b_lora", "2b_full")}
    rows = by_model["2b_lora"]
    assert set(rows) == set(by_model["2b_full"]) == {"hf", "vlmtune"}
    for row in [*rows.values(), *by_model["2b_full"].values()]:
        assert row["steps"] == 5 and row["steady_tokens_per_s"] > 0
        # --profile: vlmtune's last two steps are profiled and left out of its steady rate
        assert row["steady_steps"] == (1 if row["row"] == "vlmtune" else 3)
        assert 0 <= row["data_wait_share"] < 1 and row["peak_mem_gib"] > 0
        assert row["startup"]["load_s"] > 0 and row["startup_s"] >= row["startup"]["first_step_s"] > 0
    # packed rows compute (almost) no padding; per-batch dynamic padding of mixed lengths does
    assert rows["vlmtune"]["padding_fraction"] < 0.05 < rows["hf"]["padding_fraction"]
    assert "packed" in r.stdout and "startup: imports" in r.stdout
    # same data, same objective, same learning rate: the losses are close
    assert abs(rows["vlmtune"]["loss_last3"] - rows["hf"]["loss_last3"]) < 0.1
    # full fine-tuning: Trainer on fp32 weights vs vlm train's bf16 weights + BF16AdamW, packed, on the
    # same trained parameters (language model, embeddings, lm_head, merger) and learning the same thing
    full = by_model["2b_full"]
    assert full["vlmtune"]["optimizer"] == "bf16_adamw (stochastic)"
    assert full["hf"]["trained_parameters"] == full["vlmtune"]["trained_parameters"] > rows["vlmtune"]["trained_parameters"]
    assert full["vlmtune"]["padding_fraction"] < 0.05 < full["hf"]["padding_fraction"]
    assert abs(full["vlmtune"]["loss_last3"] - full["hf"]["loss_last3"]) < 0.1
    assert "Self CPU time total" in (tmp_path / "2b_lora" / "2b_lora_vlmtune" / "profile.txt").read_text()
    md = (tmp_path / "2b_lora" / "train_e2e_tiny.md").read_text()
    assert md.startswith("# `vlm train` end to end")
    # startup opened up: the CLI's import clock by package (the eager CPU row compiles nothing)
    split = rows["vlmtune"]["startup"]["imports_split"]   # the 14 slowest packages (which: the machine's)
    assert any(k.startswith("torch") and v > 0 for k, v in split.items()) and split["other"] >= 0, split
    assert "| vlmtune | " in md.split("Startup opened up")[1] and "(nothing compiled)" in md
    # ... and the LoRA + fast path phase by step (the full row has no LoRA step: method full)
    assert "lora " in md.split("| 2b_lora | vlmtune |")[-1] and "(CPU " in md.split("Startup opened up")[1]
    assert rows["vlmtune"]["startup"]["lora_and_fast_path_split"]["lora_s"] >= 0
