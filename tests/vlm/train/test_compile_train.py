"""`vlm train` with `training.compile: true`: the same loss curve as eager, and `--resume` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ._tiny_run import write_config


def _train(cfg, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "vlm", "train", str(cfg), *extra], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_compiled_training_matches_eager_and_resumes(tmp_path, tiny_checkpoint):
    from vlm.data_formats.synthetic import generate

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=16, seed=7)
    common = {"training.gradient_checkpointing": True, "training.schedule": "constant"}

    (tmp_path / "eager").mkdir()
    eager = write_config(tmp_path / "eager", ck, data.sharegpt_json, max_steps=4, save_steps=2,
                         extra={**common, "training.compile": False})
    _train(eager)
    ref = json.loads((tmp_path / "eager" / "out" / "summary.json").read_text())
    assert ref["compiled_layers"] is False

    (tmp_path / "compiled").mkdir()
    first = write_config(tmp_path / "compiled", ck, data.sharegpt_json, max_steps=2, save_steps=2,
                         extra={**common, "training.compile": True})
    log = _train(first)
    assert "torch.compile: 2 language decoder layers" in log
    # continue the compiled run from its checkpoint to step 4 (the override raises max_steps only)
    _train(first, "training.max_steps=4", "--resume")
    got = json.loads((tmp_path / "compiled" / "out" / "summary.json").read_text())
    assert got["compiled_layers"] is True and got["resumed_from"].endswith("checkpoint-2")
    assert got["compiled_vision_blocks"] > 0   # the frozen, batched Qwen2-VL tower compiles too
    assert [s for s, _ in got["loss_history"]] == [s for s, _ in ref["loss_history"]] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(got["loss_history"], ref["loss_history"]):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: compiled {a} vs eager {b}"
    adapter = tmp_path / "compiled" / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
