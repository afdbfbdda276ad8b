"""benchmarks/train_modes.py end to end on CPU (--tiny): every variant of both parts runs in its own
process, on the same weights and batches (same first-step loss), and the memory accounting holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_run_both_parts(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_modes.py"), "--tiny", "--device", "cpu",
                        "--steps", "1", "--warmup", "1", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    data = json.loads((tmp_path / "train_modes_tiny.json").read_text())
    full, proj = data["parts"]["full"]["rows"], data["parts"]["projector"]["rows"]
    assert set(full) == {"full_hf", "full_ours"} and set(proj) == {"proj_hf", "proj_hf16", "proj_ours"}
    assert full["full_ours"]["losses"][0] == pytest.approx(full["full_hf"]["losses"][0], rel=1e-3)
    assert proj["proj_ours"]["losses"][0] == pytest.approx(proj["proj_hf"]["losses"][0], rel=1e-3)
    assert full["full_hf"]["bytes_per_param"] == 16.0            # fp32 weights, grads, 2 moments
    assert 8.0 <= full["full_ours"]["bytes_per_param"] < 8.1     # bf16 w, g, m, v (+ fp32 norm masters)
    assert full["full_ours"]["optimizer"] == "bf16_adamw (stochastic)"
    assert full["full_ours"]["trained_parameters"] == full["full_hf"]["trained_parameters"]
    assert proj["proj_ours"]["trained_parameters"] == proj["proj_hf"]["trained_parameters"]
    ratios = data["parts"]["full"]["ratios"]["ours/full_hf"]
    assert ratios["bytes_per_param"] == pytest.approx(full["full_ours"]["bytes_per_param"] / 16.0)
    assert (tmp_path / "train_modes_tiny.md").read_text().startswith("# Training modes")
