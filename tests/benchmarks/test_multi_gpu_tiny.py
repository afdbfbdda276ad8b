"""benchmarks/multi_gpu.py on CPU (--tiny --device cpu): 2 gloo processes stand for the 2 GPUs, so
the script's every row kind runs through the real `vlm train --nproc 2` before GPU time is spent.
Checks that the rows use the end-to-end benchmark's data in packed token-budget rows, that FSDP2
holds half the parameter bytes per process, that 1 and 2 processes learn step for step the same
(test_distributed's tolerance), and that the FSDP2 checkpoint resumes on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _rows(tmp_path, *args, timeout=900) -> dict:
    """Run ``benchmarks/multi_gpu.py --tiny --device cpu --root tmp_path ARGS`` (a clean launcher
    environment) and return its rows by name."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multi_gpu.py"), "--tiny", "--device", "cpu",
                        "--root", str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {row["run"]: row for row in json.loads((tmp_path / "multi_gpu_packed_tiny.json").read_text())["rows"]}


@pytest.mark.slow
def test_tiny_rows_run_and_agree(tmp_path):
    rows = _rows(tmp_path, "--runs", "1gpu_eager,fsdp2,resume_fsdp2_on_1gpu", "--steps", "4", "--resume-steps", "1")
    one, fsdp, resumed = rows["1gpu_eager"], rows["fsdp2"], rows["resume_fsdp2_on_1gpu"]
    for row in rows.values():
        assert row["returncode"] == 0 and row["packed"] and row["padding_fraction"] < 0.05
        assert row["optimizer"] == "adamw_8bit" and row["global_batch"] == 2
    assert one["tokens"] == fsdp["tokens"] and fsdp["tokens_per_s_steady"] > 0
    assert fsdp["param_bytes_per_gpu"] == [one["param_bytes_per_gpu"][0] // 2] * 2
    for (step, a), (_, b) in zip(fsdp["loss_history"], one["loss_history"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), f"step {step}: FSDP2 {a} vs 1 process {b}"
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["steps"] == 5
    assert "| fsdp2 | 2 | 1 row(s) |" in (tmp_path / "multi_gpu_packed_tiny.md").read_text()


@pytest.mark.slow
def test_tiny_full_finetuning_rows_run_and_agree(tmp_path):
    """The method-full rows (configs/qwen2_vl_2b_full.yaml, bf16 weights + BF16AdamW) on 1 and 2 processes."""
    rows = _rows(tmp_path, "--runs", "full_1gpu,full_fsdp2", "--steps", "3", timeout=600)
    one, fsdp = rows["full_1gpu"], rows["full_fsdp2"]
    assert "qwen2_vl_2b_full.yaml" in one["command"] and one["method"] == fsdp["method"] == "full"
    assert one["optimizer"] == fsdp["optimizer"] == "adamw" and fsdp["strategy"] == "fsdp"
    assert one["tokens"] == fsdp["tokens"] and fsdp["param_bytes_per_gpu"] == [one["param_bytes_per_gpu"][0] // 2] * 2
    # bf16 weight + bf16 grad + bf16 moments (+ fp32 masters of the small tensors), per shard element
    assert fsdp["bytes_per_trained_parameter"] == one["bytes_per_trained_parameter"] < 8.5
    for (step, a), (_, b) in zip(fsdp["loss_history"], one["loss_history"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), f"step {step}: FSDP2 {a} vs 1 process {b}"
    assert "| full_fsdp2 | 2 | 1 row(s) | bf16 |" in (tmp_path / "multi_gpu_packed_tiny.md").read_text()


@pytest.mark.slow
def test_fsdp2_bf16_reduces_in_fp32_and_keeps_the_loss(tmp_path):
    """bf16 training under FSDP2: accelerate's own policy (param, reduce and output dtype bf16) cast
    the loss to bf16 and averaged gradients in bf16 (seen on 2 × H200: FSDP2 losses were bf16 values).
    The units must run with the recipe's policy — compute in bf16, reduce in fp32, outputs uncast — and
    the loss curve must be the one-process curve. ``--profile``: two more steps profiled on every
    process, each rank's table copied next to the results, the profiled steps out of the steady rate.
    One decoder layer per unit (``fsdp_layers_per_unit=1``: accelerate's own per-layer wrapping; the
    default groups the tiny model's layers, as the other tests here run it)."""
    rows = _rows(tmp_path, "--runs", "1gpu_eager,fsdp2", "--steps", "3", "--profile",
                 "--extra", "model.dtype=bf16", "training.precision=bf16", "distributed.fsdp_layers_per_unit=1")
    for rank_file, rank in (("fsdp2.profile.txt", 0), ("fsdp2.profile_rank1.txt", 1)):
        head = (tmp_path / rank_file).read_text().split("\n", 1)[0]
        assert head.startswith(f"rank {rank}, optimizer steps 4–5: wall "), head
    summary = json.loads((tmp_path / "run_fsdp2" / "summary.json").read_text())
    assert summary["config"]["logging"]["profile_steps"] == [4, 5] and summary["steps"] == 5
    one, fsdp = [loss for _, loss in rows["1gpu_eager"]["loss_history"]], [loss for _, loss in rows["fsdp2"]["loss_history"]]
    assert fsdp == pytest.approx(one, rel=2e-3)
    sharding = json.loads((tmp_path / "run_fsdp2" / "summary.json").read_text())["sharding"]
    assert sharding["mixed_precision"] == {"param_dtype": "bfloat16", "reduce_dtype": "float32", "output_dtype": None}
    assert set(sharding["layout"]["decoder_unit_layers"]) == {1}
