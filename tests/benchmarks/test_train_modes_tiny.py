"""benchmarks/train_modes.py end to end on CPU (--tiny): every variant of the three parts runs (on CPU
a part's variants share one process; on a GPU each has its own), on the same weights and batches
(same first-step loss, micro-batched or not), and the memory accounting holds."""

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
    assert set(full) == {"full_hf", "full_hf_nogc", "full_ours", "full_ours_gc", "full_ours_8bit"}
    # Trainer with and without checkpointing; ours as `vlm train` resolves auto (on for CPU) and forced on
    assert [full[v]["gradient_checkpointing"] for v in ("full_hf", "full_hf_nogc", "full_ours", "full_ours_gc")] \
        == [True, False, True, True]
    assert full["full_ours"]["gradient_checkpointing_reason"] == "auto: on for CPU runs"
    # ... and checkpointing really recomputes (each decoder layer runs twice a forward): the models
    # train in train mode, as under Trainer (in eval mode transformers' wrapper silently does nothing)
    calls = {v: r["decoder_layer_calls_per_forward"] for v, r in [*full.items(), *proj.items()]}
    assert calls == {"full_hf": 2, "full_hf_nogc": 1, "full_ours": 2, "full_ours_gc": 2, "full_ours_8bit": 2,
                     "proj_hf": 2, "proj_ours": 2, "proj_ours_mb2": 1}
    assert full["full_ours"]["compiled_vision_blocks"] == 0        # CPU: no compile
    assert set(proj) == {"proj_hf", "proj_ours", "proj_ours_mb2"}
    # micro-batches of 2 of the 4 rows, no checkpointing: the accumulated loss is the whole batch's
    assert [proj[v]["micro_batch"] for v in ("proj_hf", "proj_ours", "proj_ours_mb2")] == [4, 4, 2]
    assert [proj[v]["gradient_checkpointing"] for v in ("proj_hf", "proj_ours", "proj_ours_mb2")] == [True, True, False]
    assert proj["proj_ours_mb2"]["losses"][0] == pytest.approx(proj["proj_hf"]["losses"][0], rel=1e-3)
    assert "proj_ours_mb2/proj_hf" in data["parts"]["projector"]["ratios"]
    for rows in (full, proj):
        assert not [v for v, r in rows.items() if "error" in r]
    assert full["full_ours"]["losses"][0] == pytest.approx(full["full_hf"]["losses"][0], rel=1e-3)
    assert proj["proj_ours"]["losses"][0] == pytest.approx(proj["proj_hf"]["losses"][0], rel=1e-3)
    assert full["full_hf"]["bytes_per_param"] == 16.0            # fp32 weights, grads, 2 moments
    assert 8.0 <= full["full_ours"]["bytes_per_param"] < 8.1     # bf16 w, g, m, v (+ fp32 norm masters)
    assert full["full_ours"]["optimizer"] == "bf16_adamw (stochastic)"
    assert full["full_ours"]["trained_parameters"] == full["full_hf"]["trained_parameters"]
    assert proj["proj_ours"]["trained_parameters"] == proj["proj_hf"]["trained_parameters"]
    assert full["full_ours_8bit"]["optimizer"] == "bf16_adamw (stochastic, 8-bit moments)"
    assert full["full_ours_8bit"]["losses"][0] == pytest.approx(full["full_hf"]["losses"][0], rel=1e-3)
    assert 6.0 < full["full_ours_8bit"]["bytes_per_param"] < full["full_ours"]["bytes_per_param"] - 1.5
    ratios = data["parts"]["full"]["ratios"]["ours/full_hf"]
    assert ratios["bytes_per_param"] == pytest.approx(full["full_ours"]["bytes_per_param"] / 16.0)
    assert ratios["speed"] == pytest.approx(full["full_hf"]["step_s_median"] / full["full_ours"]["step_s_median"])
    assert "full_ours_8bit/full_hf" in data["parts"]["full"]["ratios"]
    # the optimizer step alone: every variant on the same trained parameters
    optim = data["parts"]["optim"]["rows"]
    assert set(optim) == {"optim_torch", "optim_torch_fused", "optim_legacy", "optim_ours", "optim_ours_8bit"}
    assert not [v for v, r in optim.items() if "error" in r]
    n = {r["trained_parameters"] for r in optim.values()}
    assert n == {full["full_ours"]["trained_parameters"]}
    assert optim["optim_torch"]["bytes_per_param"] == 16.0 and optim["optim_ours"]["bytes_per_param"] < 8.1
    assert {"ours/optim_torch", "ours/optim_legacy", "optim_ours_8bit/optim_torch"} <= set(
        data["parts"]["optim"]["ratios"])
    assert (tmp_path / "train_modes_tiny.md").read_text().startswith("# Training modes")
