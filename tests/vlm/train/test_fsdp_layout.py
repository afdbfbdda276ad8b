"""vlm.train.fsdp_units: how FSDP2 cuts a LoRA model into units and the prefetch between them.

Why it matters (2 x H200, Qwen2-VL-2B LoRA): with accelerate's default cut — a unit per vision block
and no forward prefetch — FSDP2 ran at 1.07x one GPU where DDP ran at 1.91x. The cut asked for here:
one unit per decoder layer, one per frozen vision tower (a unit per block where the tower trains),
and each unit starting the next decoder layer's all-gather.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import vlm
from vlm.lora import apply_lora
from vlm.train.compile import language_layers, vision_blocks
from vlm.train.fsdp_units import unit_classes
from vlm.zoo import VARIANTS

from ._tiny_run import write_config
from .test_distributed import _env


@pytest.mark.parametrize("variant", VARIANTS)
def test_frozen_tower_is_one_unit_a_trained_one_a_unit_per_block(tiny_checkpoint, variant):
    model, _ = vlm.load(tiny_checkpoint(variant), dtype="fp32", device="cpu")
    family = model.vlm_family
    peft = apply_lora(model, family, r=4, alpha=8, warn=False)   # language LoRA: the towers stay frozen
    layers = {type(layer).__name__ for layer in language_layers(peft, family)}   # Mllama: two kinds
    towers = [t for _, t in family.component_roots(peft, "vision")]
    blocks = {type(b).__name__ for b in vision_blocks(peft, family)} if family.vision_blocks else set()
    names = unit_classes(peft, family)
    assert set(names[:len(layers)]) == layers, f"{variant}: every decoder layer kind a unit: {names}"
    assert not blocks & set(names), f"{variant}: a frozen tower is cut per block: {names}"
    assert {type(t).__name__ for t in towers} <= set(names), f"{variant}: tower not one unit: {names}"

    if not blocks or not towers:
        return
    for p in towers[0].parameters():   # the tower trains (method full, vision LoRA): a unit per block
        p.requires_grad_(True)
    names = unit_classes(peft, family)
    assert blocks <= set(names) and type(towers[0]).__name__ not in names, names


@pytest.mark.slow
def test_fsdp2_lora_run_cuts_units_and_prefetches_as_reported(tmp_path, tiny_checkpoint):
    """Two gloo processes: the summary's sharding report shows the units FSDP2 built (read from the
    live modules) and the prefetch read back from FSDP's state; training matches one process."""
    from vlm.data_formats.synthetic import generate
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    ck = tiny_checkpoint("qwen2_vl")
    text = json.loads((ck / "config.json").read_text())["text_config"]["num_hidden_layers"]
    data = generate(tmp_path / "data", n=16, seed=7)
    extra = {"training.gradient_checkpointing": True}
    (tmp_path / "one").mkdir()
    one = write_config(tmp_path / "one", ck, data.sharegpt_json, max_steps=3, save_steps=10, batch_size=4,
                       extra=extra)
    ref = train(load_config(one), progress=False).summary
    (tmp_path / "two").mkdir()
    two = write_config(tmp_path / "two", ck, data.sharegpt_json, max_steps=3, save_steps=10, batch_size=2,
                       extra=extra)
    r = subprocess.run([sys.executable, "-m", "vlm", "train", str(two), "distributed.strategy=fsdp", "--nproc", "2"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "fsdp layout: forward_prefetch" in r.stdout
    got = json.loads((tmp_path / "two" / "out" / "summary.json").read_text())
    sharding = got["sharding"]
    units = sharding["unit_classes"]
    assert units.get("Qwen2VLDecoderLayer") == text
    assert units.get("Qwen2VisionTransformerPretrainedModel") == 1 and "Qwen2VLVisionBlock" not in units, units
    # every decoder layer but the last and the tower start the next layer's all-gather; all but the
    # first start the previous one's in backward
    assert sharding["layout"]["forward_prefetch"].startswith(f"{text} units")
    assert sharding["layout"]["backward_prefetch"].startswith(f"{text - 1} decoder layers")
    assert ".visual." not in " ".join(sharding["root_unit_modules"])   # the tower's unit holds it all
    whole = sharding["parameter_bytes_whole"]
    assert got["parameter_bytes_per_process"] == [whole // 2, whole // 2]
    assert got["tokens"] == ref["tokens"]
    for (step, a), (_, b) in zip(got["loss_history"], ref["loss_history"], strict=True):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: FSDP2 {a} vs one process {b}"
