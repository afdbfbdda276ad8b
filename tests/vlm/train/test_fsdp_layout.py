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
    # fsdp_frozen_towers: replicate: a frozen tower is no unit (Layout.pre_wrap leaves it out of FSDP)
    kept = unit_classes(peft, family, replicate_frozen_towers=True)
    assert not {type(t).__name__ for t in towers} & set(kept) and set(kept) >= layers, kept
    # fsdp_frozen_towers: blocks: a frozen tower cut per block (its forward holds ~2 blocks whole)
    cut = unit_classes(peft, family, tower_blocks=True)
    assert blocks <= set(cut) and not {type(t).__name__ for t in towers} & set(cut), cut

    if not blocks or not towers:
        return
    for p in towers[0].parameters():   # the tower trains (method full, vision LoRA): a unit per block
        p.requires_grad_(True)
    names = unit_classes(peft, family)
    assert blocks <= set(names) and type(towers[0]).__name__ not in names, names


@pytest.mark.parametrize(("shape", "auto"), [("2b", [5, 5, 5, 5, 4, 4]), ("7b", [1] * 28)])
def test_auto_layers_per_unit_groups_small_layers_and_keeps_large_ones_alone(shape, auto):
    """Qwen2-VL-2B's and 7B's decoder layers (real shapes, on the meta device): auto groups the 2B's
    89 MiB bf16 layers five to a unit (fewer hooks and collectives, the unit + its prefetch about one
    7B layer + its prefetch) and leaves each 445 MiB 7B layer its own unit (the memory case); an
    explicit N gives groups of at most N, as equal as they come."""
    import torch
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

    from vlm.train.fsdp_units import layer_groups

    hidden, inter, heads, kv = {"2b": (1536, 8960, 12, 2), "7b": (3584, 18944, 28, 4)}[shape]
    cfg = Qwen2VLTextConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                            num_key_value_heads=kv, num_hidden_layers=28)
    with torch.device("meta"):
        layers = [Qwen2VLDecoderLayer(cfg, i) for i in range(28)]
    groups = layer_groups(layers, 0, torch.bfloat16)
    assert [len(g) for g in groups] == auto
    assert [layer for g in groups for layer in g] == layers   # consecutive, each once, in order
    assert [len(g) for g in layer_groups(layers, 3)] == [3] * 8 + [2] * 2
    assert [len(g) for g in layer_groups(layers, 1)] == [1] * 28


@pytest.mark.slow
def test_fsdp2_lora_run_groups_layers_replicates_the_tower_and_matches_one_process(tmp_path, tiny_checkpoint):
    """Two gloo processes with the speed end of the layout knobs — ``fsdp_frozen_towers: replicate``,
    ``fsdp_reshard_after_forward: false`` and the default layers per unit (auto: the tiny model's
    small layers all in one unit): the summary's sharding report shows the units FSDP2 built (read
    from the live modules), the tower left out of FSDP (whole on each process), the prefetch read back
    from FSDP's state; training matches one process step for step. (The default layout, towers
    sharded and units resharded, is the one test_cross_resume and test_multi_gpu_tiny train.)"""
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
    r = subprocess.run([sys.executable, "-m", "vlm", "train", str(two), "distributed.strategy=fsdp",
                        "distributed.fsdp_frozen_towers=replicate", "distributed.fsdp_reshard_after_forward=false",
                        "--nproc", "2"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "fsdp layout: decoder_unit_layers" in r.stdout
    got = json.loads((tmp_path / "two" / "out" / "summary.json").read_text())
    sharding = got["sharding"]
    units = sharding["unit_classes"]
    assert units.get("Qwen2VLDecoderLayer") == text   # every layer an FSDP module ...
    assert sharding["layout"]["decoder_unit_layers"] == [text]   # ... all in one unit (one state)
    assert "Qwen2VisionTransformerPretrainedModel" not in units and "Qwen2VLVisionBlock" not in units, units
    assert sharding["fsdp_units"] == 3   # decoder layers, the tied embeddings + lm_head (accelerate's tail), root
    # the tower's unit started the first layer's all-gather; replicated, the embeddings' unit does
    assert sharding["layout"]["forward_prefetch"].startswith("1 units") and "input embeddings" in \
        sharding["layout"]["forward_prefetch"]
    assert sharding["layout"]["frozen_towers"].startswith("replicated")
    assert sharding["layout"]["reshard_after_forward"].startswith("false")
    tower = sharding["replicated_bytes"]
    assert tower > 0 and ".visual." not in " ".join(sharding["root_unit_modules"])
    whole = sharding["parameter_bytes_whole"]
    assert got["parameter_bytes_per_process"] == [(whole - tower) // 2 + tower] * 2
    assert got["tokens"] == ref["tokens"]
    for (step, a), (_, b) in zip(got["loss_history"], ref["loss_history"], strict=True):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: FSDP2 {a} vs one process {b}"
    # gradients synced once and averaged (Adam hides a gradient scale from the losses; the norm does not)
    norms = [_grad_norms(tmp_path / run / "out") for run in ("one", "two")]
    assert len(norms[0]) == 3 and norms[1] == pytest.approx(norms[0], rel=1e-4)


def _grad_norms(out):
    """grad_norm per logged step, from the last checkpoint's trainer_state.json."""
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    return [h["grad_norm"] for h in state["log_history"] if "grad_norm" in h]


def test_layout_knobs_refuse_bad_values_naming_the_key():
    from vlm.errors import ConfigError
    from vlm.train.config import parse_config

    from .test_distributed import MINIMAL

    with pytest.raises(ConfigError, match="distributed.fsdp_layers_per_unit: 0 \\(auto\\) or a number"):
        parse_config(dict(MINIMAL), ["distributed.fsdp_layers_per_unit=-1"])
    with pytest.raises(ConfigError, match="distributed.fsdp_frozen_towers: 'gather' is not allowed"):
        parse_config(dict(MINIMAL), ["distributed.fsdp_frozen_towers=gather"])
    cfg = parse_config(dict(MINIMAL), ["distributed.fsdp_layers_per_unit=4", "distributed.fsdp_frozen_towers=replicate"])
    assert (cfg.distributed.fsdp_layers_per_unit, cfg.distributed.fsdp_frozen_towers) == (4, "replicate")
