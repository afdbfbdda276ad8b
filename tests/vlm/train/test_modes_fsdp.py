"""method full / projector under FSDP2 on CPU: 2 gloo processes (``vlm train --nproc 2
distributed.strategy=fsdp``) against one process at the same global batch, on the tiny Qwen2-VL in bf16.

- The loss curves agree within test_distributed's tolerance (rel 1e-4 / abs 1e-5 per logged loss;
  why they can: its docstring). Here the weights are bf16, so the halves' gradients differ from the
  whole batch's by bf16 rounding: measured ≤ 6e-5 relative over 4 steps (full), ≤ 2e-5 (projector).
- The outputs are gathered and the same files one process writes: ``OUT/model`` (standard
  checkpoint, same tensor names, dtypes, shapes; loads in plain transformers), ``OUT/projector``.
- ``--resume`` of the FSDP2 checkpoint under FSDP2 continues the unbroken run exactly (bf16 weights,
  BF16AdamW's states and rounding keys, RNG); across strategies (FSDP2 → 1 process, 1 process →
  FSDP2) within the tolerance above (the step after the resume runs on the other split).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from ._tiny_run import write_config
from .test_distributed import ATOL, RTOL, _env

STEPS = 4


def _cfg(root, ck, data, method, batch_size, optimizer="adamw"):
    root.mkdir(parents=True)
    return write_config(root, ck, data.sharegpt_json, max_steps=STEPS, save_steps=2, batch_size=batch_size,
                        extra={"method": method, "model.dtype": "bf16", "training.precision": "bf16",
                               "training.lr": 2e-3, "training.optimizer": optimizer})


def _vlm(config, *extra, fsdp=True, resume=False):
    """``vlm train`` on 2 processes under FSDP2, or (fsdp=False) one process, in this interpreter."""
    if not fsdp:
        from vlm.train.config import load_config
        from vlm.train.recipe import train

        return train(load_config(config, list(extra)), resume=resume, progress=False)
    cmd = [sys.executable, "-m", "vlm", "train", str(config), *extra, "distributed.strategy=fsdp", "--nproc", "2"]
    r = subprocess.run(cmd + (["--resume"] if resume else []), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _losses(out):
    return dict(json.loads((out / "summary.json").read_text())["loss_history"])


def _close(got, ref, steps, what):
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=RTOL, abs=ATOL), f"step {step}: {what} {got[step]} vs {ref[step]}"


def _resumed(tmp_path, name, checkpoint, config, *, fsdp):
    out = tmp_path / name / "out"
    out.mkdir(parents=True)
    shutil.copytree(checkpoint, out / "checkpoint-2")
    _vlm(config, f"output={out}", fsdp=fsdp, resume=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert summary["strategy"] == ("fsdp" if fsdp else "single")
    return _losses(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm.data_formats.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "d", n=16, seed=5)   # 4 steps of 4 samples


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_full_under_fsdp2_matches_one_process_saves_a_standard_checkpoint_and_resumes(
        tmp_path, tiny_checkpoint, data, optimizer):
    from transformers import AutoModelForImageTextToText

    ck = tiny_checkpoint("qwen2_vl")
    one = _cfg(tmp_path / "one", ck, data, "full", 4, optimizer)
    _vlm(one, fsdp=False)
    two = _cfg(tmp_path / "two", ck, data, "full", 2, optimizer)
    r = _vlm(two)
    assert "method: full: training" in r.stdout
    ref, got = _losses(tmp_path / "one" / "out"), _losses(tmp_path / "two" / "out")
    assert sorted(got) == list(range(1, STEPS + 1))
    _close(got, ref, range(1, STEPS + 1), "FSDP2 on 2")
    assert ref[STEPS] < ref[1] - 0.2, "the run learns"

    summary = json.loads((tmp_path / "two" / "out" / "summary.json").read_text())
    one_summary = json.loads((tmp_path / "one" / "out" / "summary.json").read_text())
    assert summary["strategy"] == "fsdp" and summary["method"] == "full"
    assert summary["tokens"] == one_summary["tokens"]
    whole = summary["sharding"]["parameter_bytes_whole"]
    assert summary["parameter_bytes_per_process"] == [whole // 2, whole // 2], "every weight sharded"
    # per trained element of each process's shards: the same bf16 weights + grads + states as one process
    assert summary["bytes_per_trained_parameter"]["total"] == pytest.approx(
        one_summary["bytes_per_trained_parameter"]["total"], rel=0.02)
    assert summary["bytes_per_trained_parameter"]["weights"] == 2.0

    # the output: gathered, the same files one process writes, loading in plain transformers
    a, meta_a = _tensors(tmp_path / "one" / "out" / "model" / "model.safetensors")
    b, meta_b = _tensors(tmp_path / "two" / "out" / "model" / "model.safetensors")
    assert sorted(a) == sorted(b) and meta_a == meta_b       # tied lm_head saved once, as one process
    assert all(a[k].dtype == b[k].dtype == torch.bfloat16 and a[k].shape == b[k].shape for k in a)
    names = {p.name for p in (tmp_path / "one" / "out" / "model").iterdir()}
    assert names == {p.name for p in (tmp_path / "two" / "out" / "model").iterdir()}
    config = json.loads((tmp_path / "two" / "out" / "model" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]    # not FSDP's wrapper class
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "two" / "out" / "model").state_dict()
    base = AutoModelForImageTextToText.from_pretrained(ck, dtype=torch.bfloat16).state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert any(".language_model.layers." in k for k in changed), "the trained language weights were saved"
    assert not any(".visual.blocks." in k for k in changed), "the tower stays frozen (train_vision off)"

    # checkpoints: sharded (DCP), resumable by FSDP2 exactly and by one process / FSDP2 across strategies
    fsdp_ckpt = tmp_path / "two" / "out" / "checkpoint-2"
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= {p.name for p in fsdp_ckpt.iterdir()}
    same = _resumed(tmp_path, "fsdp_on_fsdp", fsdp_ckpt, two, fsdp=True)
    for step in (3, 4):
        assert same[step] == pytest.approx(got[step], rel=1e-6, abs=1e-7), f"step {step}: FSDP2 resume"
    # across strategies (8-bit moments: decoded, re-encoded into the other process count's blocks)
    _close(_resumed(tmp_path, "fsdp_on_one", fsdp_ckpt, two, fsdp=False), got, (3, 4), "FSDP2 ckpt on 1")
    if optimizer == "adamw":
        _close(_resumed(tmp_path, "one_on_fsdp", tmp_path / "one" / "out" / "checkpoint-2", two, fsdp=True),
               ref, (3, 4), "1-process ckpt under FSDP2")


@pytest.mark.slow
def test_projector_under_fsdp2_matches_one_process_writes_the_same_file_and_resumes(tmp_path, tiny_checkpoint,
                                                                                    data):
    ck = tiny_checkpoint("qwen2_vl")
    one = _cfg(tmp_path / "one", ck, data, "projector", 4)
    _vlm(one, fsdp=False)
    two = _cfg(tmp_path / "two", ck, data, "projector", 2)
    _vlm(two)
    ref, got = _losses(tmp_path / "one" / "out"), _losses(tmp_path / "two" / "out")
    _close(got, ref, range(1, STEPS + 1), "projector under FSDP2")
    summary = json.loads((tmp_path / "two" / "out" / "summary.json").read_text())
    whole = summary["sharding"]["parameter_bytes_whole"]
    assert summary["parameter_bytes_per_process"] == [whole // 2, whole // 2], "frozen tower and LM sharded too"

    a, meta_a = _tensors(tmp_path / "one" / "out" / "projector" / "projector.safetensors")
    b, meta_b = _tensors(tmp_path / "two" / "out" / "projector" / "projector.safetensors")
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert sorted(meta_a) == sorted(meta_b) == ["format", "vlmtune"]
    vlmtune = json.loads(meta_b["vlmtune"])
    assert vlmtune["method"] == "projector" and vlmtune["training"]["batch_size"] == 2
    base = _tensors(next((tmp_path / "one" / "out" / "checkpoint-2").glob("projector.safetensors")))[0]
    assert sorted(base) == sorted(b)

    ckpt = tmp_path / "two" / "out" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"projector.safetensors", "optimizer_0"} <= names and "pytorch_model_fsdp_0" not in names, \
        "a projector checkpoint holds the projector and the optimizer, not the frozen model's shards"
    same = _resumed(tmp_path, "fsdp_on_fsdp", ckpt, two, fsdp=True)
    for step in (3, 4):
        assert same[step] == pytest.approx(got[step], rel=1e-6, abs=1e-7), f"step {step}: FSDP2 resume"
    _close(_resumed(tmp_path, "fsdp_on_one", ckpt, two, fsdp=False), got, (3, 4), "FSDP2 ckpt on 1")


def test_what_cannot_work_under_fsdp_is_refused_with_the_reason(tmp_path, tiny_checkpoint, data, monkeypatch):
    """Checked before any process group exists (a launched process of 2): FSDP1, full state dicts."""
    from vlm.errors import ConfigError
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for method in ("full", "projector"):
        cfg = _cfg(tmp_path / method, tiny_checkpoint("qwen2_vl"), data, method, 2)
        with pytest.raises(ConfigError, match="fsdp_version: 2 .*FlatParameters"):
            train(load_config(cfg, ["distributed.strategy=fsdp", "distributed.fsdp_version=1"]), progress=False)
        with pytest.raises(ConfigError, match="fsdp_state_dict: sharded.*a collective"):
            train(load_config(cfg, ["distributed.strategy=fsdp", "distributed.fsdp_state_dict=full"]),
                  progress=False)
