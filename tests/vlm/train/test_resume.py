"""Checkpoints are atomic and `--resume` continues exactly: a run killed with SIGKILL mid-training
and resumed ends with the same loss curve as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._tiny_run import write_config
from vlm.train.checkpoints import MARKER, latest_complete


def _vlm(*args):
    return [sys.executable, "-m", "vlm", *args]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_incomplete_checkpoint_is_never_the_resume_point(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (d / MARKER).write_text(json.dumps({"step": step}))
    assert latest_complete(tmp_path) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists(), "a half-written checkpoint is removed"


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_checkpoint):
    from vlm.data_formats.synthetic import generate

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=24, seed=5)
    steps = 10  # 24 samples / batch 4 = 6 steps per epoch: the run crosses an epoch boundary

    (tmp_path / "full").mkdir()
    full = write_config(tmp_path / "full", ck, data.sharegpt_json, max_steps=steps, save_steps=3)
    subprocess.run(_vlm("train", str(full)), check=True, env=_env(), capture_output=True, text=True,
                   timeout=300)
    ref = json.loads((tmp_path / "full" / "out" / "summary.json").read_text())["loss_history"]

    (tmp_path / "killed").mkdir()
    cfg = write_config(tmp_path / "killed", ck, data.sharegpt_json, max_steps=steps, save_steps=3)
    out = tmp_path / "killed" / "out"
    proc = subprocess.Popen(_vlm("train", str(cfg)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-6" / MARKER).exists():  # kill after the 2nd complete checkpoint
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run was killed before it finished"

    r = subprocess.run(_vlm("train", str(cfg), "--resume"), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] and Path(summary["resumed_from"]).name.startswith("checkpoint-")
    got = summary["loss_history"]
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(1, steps + 1))
    for (step, a), (_, b) in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}: resumed {a} vs uninterrupted {b}"
