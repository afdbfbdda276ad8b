"""benchmarks/train_e2e.py on CPU (--tiny): the real `vlm train` CLI and the transformers Trainer (+ PEFT)
baseline each run in their own process on the generated realistic data, for LoRA (2b_lora) and full
fine-tuning (2b_full), and every number of the table comes back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tiny_rows_measure_and_learn_the_same_thing(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)   # CPU without the interpreter: vlm.kernels.patch steps aside
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_e2e.py"), "--tiny", "--device", "cpu",
                        "--out", str(tmp_path), "--steps", "5", "--warmup", "1", "--profile",
                        "--models", "2b_lora,2b_full"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "train_e2e_tiny.json").read_text())
    by_model = {m: {row["row"]: row for row in data["rows"] if row["model"] == m} for m in ("2b_lora", "2b_full")}
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
    assert "Self CPU time total" in (tmp_path / "2b_lora_vlmtune" / "profile.txt").read_text()
    assert (tmp_path / "train_e2e_tiny.md").read_text().startswith("# `vlm train` end to end")
