"""The propagated-error sensitivity (vlm.quant.propagated) measures, from cached block inputs, exactly
what a whole-model forward with the group quantized shows at the block's output."""

import pytest
import torch

from vlm.quant.agreement import simulated
from vlm.quant.calibration import calibration_batches
from vlm.quant.capture import move_batch
from vlm.quant.propagated import block_of, blocks_from, propagated_sensitivity, relative_error_sum
from tests.conftest import ZOO_VARIANTS


@pytest.fixture(scope="module")
def model_and_batches(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_checkpoint("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, calibration_batches(None, AutoProcessor.from_pretrained(path), n=2, seed=0)


GROUPS = {  # group -> (its block, its members)
    "language_mlp": ("model.language_model.layers.1",
                     {"model.language_model.layers.1.mlp.down_proj": "nf4"}),
    "language_qkv": ("model.language_model.layers.0",
                     {f"model.language_model.layers.0.self_attn.{p}_proj": "nf4" for p in "qkv"}),
    "vision": ("model.visual.blocks.0", {"model.visual.blocks.0.attn.qkv": "nf4"}),
    "projector": ("model.visual.merger.mlp", {"model.visual.merger.mlp.0": "nf4"}),
}


def test_blocks_are_list_elements_else_the_parent(model_and_batches, tiny_checkpoint):
    from transformers import AutoConfig

    from vlm.quant.loading import meta_model

    modules = dict(model_and_batches[0].named_modules())
    for block, members in GROUPS.values():
        for m in members:
            assert block_of(m, modules) == block
    assert block_of("lm_head", modules) == "lm_head"
    mllama = dict(meta_model(AutoConfig.from_pretrained(tiny_checkpoint("mllama"))).named_modules())
    assert block_of("model.multi_modal_projector", mllama) == "model.multi_modal_projector"


def _whole_model_error(model, block, members, batches):
    """E at ``block``'s output from full forwards: 16-bit, then with ``members`` quantized."""
    mod = dict(model.named_modules())[block]
    seen = []
    handle = mod.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).clone()))
    try:
        with torch.no_grad():
            for b in batches:
                model(**move_batch(b, "cpu", torch.float32))
            with simulated(model, members):
                for b in batches:
                    model(**move_batch(b, "cpu", torch.float32))
    finally:
        handle.remove()
    n = len(batches)
    total = [relative_error_sum(q, r) for r, q in zip(seen[:n], seen[n:])]
    return sum(s for s, _ in total) / sum(c for _, c in total)


@pytest.mark.parametrize("extend", [None, 0, 1, 3])
@pytest.mark.parametrize("which", sorted(GROUPS))
def test_block_error_equals_the_whole_model_forward(model_and_batches, which, extend):
    """E_g from cached block inputs = the error a whole-model forward with g quantized shows at the
    last block measured: the end of g's stack (default), its own block (0), the next one (1)."""
    model, batches = model_and_batches
    block, members = GROUPS[which]
    last = blocks_from(block, dict(model.named_modules()), extend)[-1]
    if extend is None and which.startswith("language"):
        assert last == f"model.language_model.layers.{model.config.text_config.num_hidden_layers - 1}"
    got = propagated_sensitivity(model, {which: members, "kept": {m: "bf16" for m in members}},
                                 batches, extend=extend)
    want = _whole_model_error(model, last, members, batches)
    assert want > 0
    assert got[which] == pytest.approx(want, rel=1e-4)
    assert got["kept"] == 0.0          # re-running blocks on their cached inputs is exact


@pytest.mark.parametrize("variant", ZOO_VARIANTS)
def test_every_family_measures_every_group_as_its_whole_model_forward(tiny_checkpoint, variant):
    """For each zoo family: every candidate group gets a finite score; a group left 16-bit scores
    exactly 0; the largest-scoring group's score equals the error a whole-model forward shows at
    the end of its stack (block kwargs such as masks, position embeddings, cu_seqlens, cross-attention
    states are replayed correctly)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm.families import family_for_config
    from vlm.quant.plan import resolve_plan
    from vlm.quant.policy import QUANTIZED, QuantPolicy

    path = tiny_checkpoint(variant)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    batches = calibration_batches(None, AutoProcessor.from_pretrained(path), n=1, seed=0)
    plan = resolve_plan(QuantPolicy.parse("dynamic"), model, family_for_config(model.config))
    groups: dict[str, dict[str, str]] = {}
    for n, lp in plan.layers.items():
        if lp.reason == "component" and lp.precision in QUANTIZED:
            groups.setdefault(lp.group, {})[n] = lp.precision
    first = next(iter(groups))
    groups["kept"] = {m: "bf16" for m in groups[first]}
    got = propagated_sensitivity(model, groups, batches, extend=None)
    assert got["kept"] == 0.0
    assert all(v is not None and 0 <= v < float("inf") for v in got.values())
    top = max((g for g in groups if g != "kept"), key=lambda g: got[g])
    modules = dict(model.named_modules())
    block = blocks_from(block_of(next(iter(groups[top])), modules), modules, None)[-1]
    assert got[top] > 0
    assert got[top] == pytest.approx(_whole_model_error(model, block, groups[top], batches), rel=1e-4)
