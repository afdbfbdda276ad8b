"""The propagated-error sensitivity (vlm.quant.propagated) measures, from cached block inputs, exactly
what a whole-model forward with the group quantized shows at the block's output."""

import pytest
import torch

from vlm.quant.agreement import simulated
from vlm.quant.calibration import calibration_batches
from vlm.quant.capture import move_batch
from vlm.quant.propagated import block_of, propagated_sensitivity, relative_error_sum


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


def test_blocks_are_list_elements_else_the_parent(model_and_batches):
    modules = dict(model_and_batches[0].named_modules())
    for block, members in GROUPS.values():
        for m in members:
            assert block_of(m, modules) == block


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


@pytest.mark.parametrize("which", sorted(GROUPS))
def test_block_error_equals_the_whole_model_forward(model_and_batches, which):
    model, batches = model_and_batches
    block, members = GROUPS[which]
    got = propagated_sensitivity(model, {which: members, "kept": {m: "bf16" for m in members}},
                                 batches)
    want = _whole_model_error(model, block, members, batches)
    assert want > 0
    assert got[which] == pytest.approx(want, rel=1e-4)
    assert got["kept"] == 0.0          # re-running a block on its cached inputs is exact


def test_extend_measures_further_down_the_residual_stream(model_and_batches):
    model, batches = model_and_batches
    _, members = GROUPS["language_qkv"]
    last = f"model.language_model.layers.{model.config.text_config.num_hidden_layers - 1}"
    got = propagated_sensitivity(model, {"g": members}, batches, extend=99)["g"]
    assert got == pytest.approx(_whole_model_error(model, last, members, batches), rel=1e-4)

