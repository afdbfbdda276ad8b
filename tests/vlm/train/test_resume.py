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

from ..._concurrent import Run
from ._tiny_run import write_config
from vlm.errors import VlmError
from vlm.train.checkpoints import MARKER, SAVING, checkpoint_record, latest_complete, run_totals


def _vlm(*args):
    return [sys.executable, "-m", "vlm", *args]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop("TRITON_INTERPRET", None)
    return env


def _checkpoint(root: Path, step: int, marker: str | None) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"x")
    if marker is not None:
        (d / marker).write_text(json.dumps({"step": step}))
    return d


def test_incomplete_checkpoint_is_never_the_resume_point(tmp_path):
    for step, marker in ((2, MARKER), (4, MARKER), (6, SAVING)):
        _checkpoint(tmp_path, step, marker)
    said = []
    assert latest_complete(tmp_path, say=said.append) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists(), "our own half-written checkpoint is removed"
    assert said == [f"--resume: removed {tmp_path / 'checkpoint-6'}: its save was interrupted (no {MARKER})"]


def test_a_checkpoint_vlmtune_did_not_write_is_never_deleted(tmp_path):
    _checkpoint(tmp_path, 2, MARKER)
    foreign = _checkpoint(tmp_path, 500, None)   # e.g. written by plain transformers
    with pytest.raises(VlmError, match=r"holds checkpoint-500 without vlmtune_complete.json .* left untouched"):
        latest_complete(tmp_path)
    assert (foreign / "adapter_model.safetensors").read_bytes() == b"x"


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_checkpoint):
    from vlm.data_formats.synthetic import generate

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=24, seed=5)
    steps = 10  # 24 samples / batch 4 = 6 steps per epoch: the run crosses an epoch boundary

    (tmp_path / "full").mkdir()
    full = write_config(tmp_path / "full", ck, data.sharegpt_json, max_steps=steps, save_steps=3)
    # the uninterrupted reference runs beside the run that gets killed (tests/_concurrent.py)
    reference = Run(_vlm("train", str(full)), tmp_path / "full" / "logs", env=_env())

    (tmp_path / "killed").mkdir()
    cfg = write_config(tmp_path / "killed", ck, data.sharegpt_json, max_steps=steps, save_steps=3)
    out = tmp_path / "killed" / "out"
    proc = subprocess.Popen(_vlm("train", str(cfg)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 420   # a hang guard: two runs share the cores meanwhile
        while not (out / "checkpoint-6" / MARKER).exists():  # kill after the 2nd complete checkpoint
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "summary.json").exists(), "the run was killed before it finished"
        done = reference.wait(timeout=300)
    finally:
        reference.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert done.returncode == 0, done.stderr[-2000:]
    ref = json.loads((tmp_path / "full" / "out" / "summary.json").read_text())["loss_history"]

    r = subprocess.run(_vlm("train", str(cfg), "--resume"), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] and Path(summary["resumed_from"]).name.startswith("checkpoint-")
    got = summary["loss_history"]
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(1, steps + 1))
    for (step, a), (_, b) in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}: resumed {a} vs uninterrupted {b}"


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_resume_keeps_the_whole_run_and_never_overwrites_a_finished_one(tmp_path, tiny_checkpoint, capsys):
    """Four steps, then --resume to six: summary.json counts all six (as an uninterrupted run of
    six does); resuming the finished run trains nothing and keeps its files; a changed config is
    named; a new run in a finished run's folder is refused, also once its checkpoints are pruned."""
    import shutil

    from vlm.data_formats.synthetic import generate
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=12, seed=5)

    def cfg(name, *overrides):
        (tmp_path / name).mkdir(exist_ok=True)
        return load_config(write_config(tmp_path / name, ck, data.sharegpt_json, max_steps=4, save_steps=2),
                           list(overrides))

    out = tmp_path / "run" / "out"
    first = train(cfg("run"), progress=False).summary
    assert first["segments"] == 1 and first["tokens"] == first["this_segment"]["tokens"] > 0
    resumed = train(cfg("run", "training.max_steps=6"), resume=True, progress=False).summary
    reference = train(cfg("ref", "training.max_steps=6"), progress=False).summary
    assert resumed["steps"] == reference["steps"] == 6 and resumed["segments"] == 2
    for key in ("tokens", "label_tokens"):
        assert resumed[key] == reference[key] == first[key] + resumed["this_segment"][key], key
    # time: the first segment up to the checkpoint resumed from, plus all of the second
    at_checkpoint = run_totals(checkpoint_record(out / "checkpoint-4"))
    assert at_checkpoint["segments"] == 1 and 0 < at_checkpoint["wall_seconds"] <= first["wall_seconds"]
    for key in ("train_seconds", "wall_seconds"):
        assert resumed[key] == pytest.approx(at_checkpoint[key] + resumed["this_segment"][key], abs=2e-3), key
    capsys.readouterr()

    # resuming the finished run, with another lr, seed and data weight: named, nothing rewritten
    summary_bytes = (out / "summary.json").read_bytes()
    adapter_bytes = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    again = train(cfg("run", "training.max_steps=6", "training.lr=0.001", "training.seed=4",
                      f"data.train=[{{path: {data.sharegpt_json}, weight: 2.0}}]"), resume=True, progress=False)
    said = capsys.readouterr().out
    assert "warning: --resume: the config differs from the one checkpoint-6 was trained with" in said
    for change in ("training.lr: 0.005 -> 0.001", "training.seed: 3 -> 4", "data.train[0].weight: 1.0 -> 2.0"):
        assert change in said, said
    assert "had already finished at step 6; nothing left to train" in said
    assert again.summary == _summary(out) == json.loads(json.dumps(resumed))
    assert (out / "summary.json").read_bytes() == summary_bytes
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_bytes

    with pytest.raises(VlmError, match="already holds checkpoints"):
        train(cfg("run", "training.max_steps=6"), progress=False)
    for d in out.glob("checkpoint-*"):   # the user prunes the checkpoints of the finished run
        shutil.rmtree(d)
    with pytest.raises(VlmError, match=r"holds a finished run \(adapter, summary.json\): a new run would replace it"):
        train(cfg("run", "training.max_steps=6"), progress=False)
    with pytest.raises(VlmError, match=r"--resume: .* holds a finished run .* but no checkpoint"):
        train(cfg("run", "training.max_steps=6"), resume=True, progress=False)
    assert (out / "summary.json").read_bytes() == summary_bytes
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_bytes
