"""method: full and method: projector end to end on tiny models: what trains, what is saved, what
loads it (plain transformers), and the errors a user gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ._tiny_run import write_config
from vlm.errors import ConfigError, VlmError
from vlm.train.checkpoints import MARKER
from vlm.zoo import VARIANTS


def _run(tmp_path, ck, data_json, method, *, steps=3, extra=None, name="run"):
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    root = tmp_path / name
    root.mkdir()
    cfg = write_config(root, ck, data_json, max_steps=steps, save_steps=steps,
                       extra={"method": method, "model.dtype": "bf16", "training.precision": "bf16",
                              "training.lr": 1e-3, **(extra or {})})
    return train(load_config(cfg))


def _stage1_records(data, out: Path) -> Path:
    """LLaVA stage-1 caption pairs (blip_laion_cc_sbu_558k layout): the human turn is the image
    alone, the answer the caption."""
    recs = json.loads(Path(data.sharegpt_json).read_text())
    pairs = [{"id": str(i), "image": r["image"],
              "conversations": [{"from": "human", "value": "<image>\n"},
                                {"from": "gpt", "value": r["conversations"][-1]["value"]}]}
             for i, r in enumerate(recs)]
    path = Path(data.sharegpt_json).parent / "stage1.json"
    path.write_text(json.dumps(pairs))
    return path


def _hf(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm.data_formats.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "d", n=12, seed=5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_trains_language_and_projector_and_saves_a_standard_checkpoint(tmp_path, tiny_checkpoint,
                                                                            data, variant):
    import vlm

    ck = tiny_checkpoint(variant)
    res = _run(tmp_path, ck, data.sharegpt_json, "full")
    assert res.summary["method"] == "full" and res.summary["optimizer"] == "bf16_adamw (stochastic)"
    assert res.adapter_dir.name == "model" and (res.adapter_dir / "model.safetensors").is_file()
    base, _ = vlm.load(ck, dtype="bf16", device="cpu")
    family = base.vlm_family
    tuned = _hf(res.adapter_dir)                                 # plain transformers loads it
    assert tuned.dtype == torch.bfloat16
    before = dict(base.named_parameters())
    changed = {family.component_of(n.rsplit(".", 1)[0]) for n, p in tuned.named_parameters()
               if not torch.equal(p, before[n])}
    assert {"language", "projector", "embeddings"} <= changed, changed
    assert "vision" not in changed                               # training.train_vision: false
    # the saved processor and our metadata ride along
    assert json.loads((res.adapter_dir / "vlmtune.json").read_text())["vlmtune"]["method"] == "full"
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(res.adapter_dir)


def test_full_with_train_vision_trains_the_tower(tmp_path, tiny_checkpoint, data):
    ck = tiny_checkpoint("qwen2_vl")
    res = _run(tmp_path, ck, data.sharegpt_json, "full", extra={"training.train_vision": True}, steps=2)
    import vlm

    base, _ = vlm.load(ck, dtype="bf16", device="cpu")
    family = base.vlm_family
    tuned = _hf(res.adapter_dir)
    before = dict(base.named_parameters())
    changed = {family.component_of(n.rsplit(".", 1)[0]) for n, p in tuned.named_parameters()
               if not torch.equal(p, before[n])}
    assert "vision" in changed


def test_full_is_refused_on_a_4bit_model(tmp_path, tiny_checkpoint, data):
    ck = tiny_checkpoint("qwen2_vl")
    with pytest.raises(ConfigError, match=r"method: full .*4/8-bit.*quant: bf16.*method: lora"):
        _run(tmp_path, ck, data.sharegpt_json, "full", extra={"quant": "nf4", "model.dtype": "fp32",
                                                              "training.precision": "fp32"})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_projector_method_trains_exactly_the_family_projector(tiny_checkpoint, variant):
    import vlm
    from vlm.train.modes import set_trainable

    model, _ = vlm.load(tiny_checkpoint(variant), dtype="bf16", device="cpu")
    family = model.vlm_family
    counts = set_trainable(model, family, ("projector",))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and set(counts) == {"projector"}
    prefixes = family.component_prefixes["projector"]
    assert all(n.startswith(tuple(p + "." for p in prefixes)) for n in trainable), trainable
    assert sum(p.numel() for _, root in family.component_roots(model, "projector")
               for p in root.parameters()) == counts["projector"]


def _projector_of(model, family) -> dict[str, torch.Tensor]:
    from vlm.train.modes import projector_state_dict

    return projector_state_dict(model, family)


@pytest.mark.parametrize("variant", sorted(VARIANTS))   # skips a family that declares no projector
def test_projector_pretraining_on_caption_pairs_then_stage2_start(tmp_path, tiny_checkpoint, data, variant):
    """Stage 1 on `<image>` + caption records trains only the projector and writes a projector-only
    safetensors; plain transformers loads it with load_state_dict(strict=False); a LoRA run and a full
    run start from it (model.projector_init), and the LoRA adapter carries it (PEFT on the plain base
    runs the stage-1 projector, not the base's)."""
    import vlm
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    ck = tiny_checkpoint(variant)
    base, _ = vlm.load(ck, dtype="bf16", device="cpu")
    family = base.vlm_family
    if not family.component_prefixes.get("projector"):
        pytest.skip(f"{family.name} declares no projector")
    pairs = _stage1_records(data, tmp_path)
    res = _run(tmp_path, ck, pairs, "projector", steps=2, extra={"training.lr": 1e-2})
    assert res.summary["data"]["rejected"]["total"] == 0 and res.summary["samples"] == 12
    path = res.adapter_dir / "projector.safetensors"
    tensors = load_file(str(path))
    before = _projector_of(base, family)
    assert set(tensors) == set(before)                              # the projector, all of it, only it
    assert any(not torch.equal(t, before[k]) for k, t in tensors.items()), "the projector trained"
    with safe_open(str(path), "pt") as f:                          # metadata rides in the file
        meta = json.loads(f.metadata()["vlmtune"])
    assert meta["method"] == "projector" and meta["family"] == family.name

    hf = _hf(ck)                                                   # plain transformers + safetensors
    result = hf.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys
    state = hf.state_dict()
    for k, t in tensors.items():
        assert torch.equal(state[k], t), k

    # stage 2 with a learning rate too small to move a bf16 weight: the start is what the file holds
    tiny_lr = {"training.lr": 1e-12, "model.projector_init": str(res.adapter_dir)}
    lora = _run(tmp_path, ck, data.sharegpt_json, "lora", steps=1, name="stage2_lora", extra=tiny_lr)
    assert lora.summary["method"] == "lora"
    assert json.loads((lora.adapter_dir / "vlmtune.json").read_text())["vlmtune"]["projector_init"]
    peft = PeftModel.from_pretrained(_hf(ck), str(lora.adapter_dir))
    merged = _projector_of(peft.merge_and_unload(), family)
    for k, t in tensors.items():
        assert torch.equal(merged[k], t), f"{k}: the adapter on the plain base lost the stage-1 projector"

    from vlm.export.adapter import AdapterError, read_adapter

    with pytest.raises(AdapterError, match="projector-only file .*model.projector_init"):
        read_adapter(res.adapter_dir)                  # vlm export / serve on the stage-1 folder
    full = _run(tmp_path, ck, data.sharegpt_json, "full", steps=1, name="stage2_full", extra=tiny_lr)
    with pytest.raises(AdapterError, match="whole model"):
        read_adapter(full.adapter_dir)
    saved = _projector_of(_hf(full.adapter_dir), family)
    for k, t in tensors.items():
        assert torch.equal(saved[k], t), k


def test_projector_init_names_a_wrong_file(tmp_path, tiny_checkpoint):
    import vlm
    from safetensors.torch import save_file
    from vlm.train.modes import load_projector, projector_state_dict

    model, _ = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="bf16", device="cpu")
    family = model.vlm_family
    with pytest.raises(VlmError, match="does not exist"):
        load_projector(model, family, tmp_path / "nope")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VlmError, match="junk.safetensors is not a readable safetensors file"):
        load_projector(model, family, tmp_path / "junk.safetensors")
    own = projector_state_dict(model, family)
    save_file({"model.language_model.norm.weight": torch.ones(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(VlmError, match="not this qwen2_vl model's projector"):
        load_projector(model, family, tmp_path / "other.safetensors")
    k = next(iter(own))
    save_file({**own, k: torch.zeros(1)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(VlmError, match="shapes differ"):
        load_projector(model, family, tmp_path / "shape.safetensors")


@pytest.mark.parametrize("override, message", [
    ({"training.train_vision": True}, "applies to method: full"),
    ({"method": "projector", "training.train_vision": True}, "applies to method: full"),
    ({"method": "ful"}, "choose one of: lora, full, projector"),
])
def test_config_errors(tmp_path, override, message):
    from vlm.train.config import parse_config

    data = {"model": "x", "data": {"train": ["d.json"]}}
    for k, v in override.items():
        node = data
        *parents, last = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_sgd_refused_for_16bit_full_and_8bit_for_projector(tmp_path, tiny_checkpoint, data):
    with pytest.raises(ConfigError, match="stalls"):
        _run(tmp_path, tiny_checkpoint("qwen2_vl"), data.sharegpt_json, "full",
             extra={"training.optimizer": "sgd"})
    with pytest.raises(ConfigError, match="adamw_8bit: method: projector keeps an fp32 master"):
        _run(tmp_path, tiny_checkpoint("qwen2_vl"), data.sharegpt_json, "projector", name="p",
             extra={"training.optimizer": "adamw_8bit"})


def test_full_with_8bit_moments_trains_and_reports_bytes_per_parameter(tmp_path, tiny_checkpoint, data):
    """training.optimizer: adamw_8bit with method: full: BF16AdamW with bitsandbytes' blockwise 8-bit
    moments (on CPU too); summary.json reports what a trained parameter costs against the bf16-moment
    default."""
    ck = tiny_checkpoint("qwen2_vl")
    runs = {opt: _run(tmp_path, ck, data.sharegpt_json, "full", steps=4, name=opt,
                      extra={"training.optimizer": opt}).summary for opt in ("adamw", "adamw_8bit")}
    eight, sixteen = runs["adamw_8bit"], runs["adamw"]
    assert eight["optimizer"] == "bf16_adamw (stochastic, 8-bit moments)"
    assert sixteen["bytes_per_trained_parameter"]["weights"] == 2.0
    assert 4.0 <= sixteen["bytes_per_trained_parameter"]["optimizer"] < 4.2      # bf16 m, v (+ fp32 norms)
    # tensors >= 4,096 elements: 1 + 1 byte + an fp32 absmax per 256; the tiny model's smaller ones
    # (and the fp32-master vectors) keep 16/32-bit moments, so the mean sits above 2.03
    assert 2.0 < eight["bytes_per_trained_parameter"]["optimizer"] < 2.3        # measured 2.19
    assert eight["bytes_per_trained_parameter"]["total"] < sixteen["bytes_per_trained_parameter"]["total"] - 1.4
    losses = [l for _, l in eight["loss_history"]]
    assert losses[-1] < losses[0]                                               # it learns


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("method, optimizer", [("full", "adamw"), ("projector", "adamw"), ("full", "adamw_8bit")])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_checkpoint, method, optimizer):
    """As tests/vlm/train/test_resume.py for LoRA: bf16 weights, BF16AdamW's stochastic rounding, fp32
    masters and 8-bit moments come back from the checkpoint so the resumed loss curve equals the
    unbroken one."""
    from vlm.data_formats.synthetic import generate

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=24, seed=5)
    steps = 10
    extra = {"method": method, "model.dtype": "bf16", "training.precision": "bf16", "training.lr": 2e-3,
             "training.optimizer": optimizer}
    vlm = [sys.executable, "-m", "vlm", "train"]

    (tmp_path / "full").mkdir()
    full = write_config(tmp_path / "full", ck, data.sharegpt_json, max_steps=steps, save_steps=3, extra=extra)
    subprocess.run([*vlm, str(full)], check=True, env=_env(), capture_output=True, text=True, timeout=300)
    ref = json.loads((tmp_path / "full" / "out" / "summary.json").read_text())["loss_history"]

    (tmp_path / "killed").mkdir()
    cfg = write_config(tmp_path / "killed", ck, data.sharegpt_json, max_steps=steps, save_steps=3, extra=extra)
    out = tmp_path / "killed" / "out"
    proc = subprocess.Popen([*vlm, str(cfg)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-6" / MARKER).exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()

    if method == "projector":   # its checkpoints hold the projector, not the whole model
        assert (out / "checkpoint-6" / "projector.safetensors").is_file()
        assert not list((out / "checkpoint-6").glob("model*.safetensors"))
    r = subprocess.run([*vlm, str(cfg), "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] and summary["method"] == method
    got = summary["loss_history"]
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(1, steps + 1))
    assert ref[-1][1] < ref[0][1] - 0.05, "the run learns"
    for (step, a), (_, b) in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}: resumed {a} vs uninterrupted {b}"


@pytest.mark.parametrize("method", ["full", "projector"])
def test_checkpointed_modes_keep_the_frozen_tower_out_of_autograd(tiny_checkpoint, method):
    """With gradient checkpointing, transformers would hook the vision patch embedding so that its
    output requires grad even inside the frozen tower's no_grad (a second variant of a compiled first
    block); prepare leaves that hook off, and the trained parts still get gradients."""
    import vlm
    from vlm.train.config import parse_config
    from vlm.train.modes import prepare

    from .test_lora import _tiny_batch

    model, _ = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="fp32", device="cpu")
    family = model.vlm_family
    cfg = parse_config({"method": method, "model": {"path": "x", "dtype": "fp32"}, "data": {"train": ["d.json"]},
                        "training": {"gradient_checkpointing": True, "lr": 1e-3}})
    prepare(model, family, cfg)
    model.train()
    seen = {}
    vis = family.component_roots(model, "vision")[0][1]
    def record(mod, args):
        seen.setdefault("block0", args[0].requires_grad)

    hook = vis.blocks[0].register_forward_pre_hook(record)
    model(**_tiny_batch(model, 0)).loss.backward()
    hook.remove()
    assert seen["block0"] is False
    grads = {family.component_of(n.rsplit(".", 1)[0]) for n, p in model.named_parameters() if p.grad is not None}
    assert "projector" in grads and "vision" not in grads
    assert ("language" in grads) == (method == "full")
