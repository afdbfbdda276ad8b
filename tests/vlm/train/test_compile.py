"""vlm.train.compile: compiled decoder layers compute the same loss and LoRA gradients as eager."""

import copy

import pytest
import torch

import vlm
from vlm.lora import apply_lora
from vlm.train.compile import (chunk_mlps, compile_language_layers, compile_vision_blocks, is_compiled,
                               kernel_patch_options, language_layers, vision_blocks)
from vlm.vision_attention import batch_equal_images
from vlm.zoo import VARIANTS


def _batch(processor):
    from PIL import Image
    import numpy as np

    img = Image.fromarray((np.random.RandomState(0).rand(56, 56, 3) * 255).astype("uint8"))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red square on the left"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    b = processor(text=[text, text], images=[img, img], return_tensors="pt")
    b["labels"] = b["input_ids"].clone()
    return b


def _loss_and_grads(model, batch, autocast=False):
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _lora(model, seed=0):
    peft_model = apply_lora(model, model.vlm_family, r=8, alpha=16, gradient_checkpointing=True, warn=False)
    g = torch.Generator().manual_seed(seed)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:   # non-zero B so every adapter gradient is non-trivial
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model


def _graph_breaks():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return vlm.load(tiny_checkpoint("qwen2_vl"), dtype="fp32", device="cpu")


def _eager_reference(qwen, seed):
    """(model, batch, a LoRA copy to transform, eager loss, eager grads); dynamo's caches reset."""
    model, processor = qwen
    batch = _batch(processor)
    eager = _lora(copy.deepcopy(model), seed=seed)
    other = copy.deepcopy(eager)
    l_eager, g_eager = _loss_and_grads(eager, batch)
    torch._dynamo.reset()
    return model, batch, other, l_eager, g_eager


def test_compiled_layers_same_loss_and_grads_checkpoint_inside(qwen):
    model, batch, compiled, l_eager, g_eager = _eager_reference(qwen, seed=0)
    n = compile_language_layers(compiled, model.vlm_family, backend="aot_eager")
    layers = language_layers(compiled, model.vlm_family)
    assert n == len(layers) and is_compiled(compiled, model.vlm_family)
    # the checkpoint moved inside the compiled call: HF's wrapper is off, ours is on
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert all("_vlm_uncheckpointed_forward" in layer.__dict__ for layer in layers)
    assert compile_language_layers(compiled, model.vlm_family, backend="aot_eager") == 0   # idempotent
    l_comp, g_comp = _loss_and_grads(compiled, batch)
    assert _graph_breaks() == 0
    assert set(g_comp) == set(g_eager) and g_eager
    assert l_comp == pytest.approx(l_eager, rel=1e-6)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_comp[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_mlps_compile_to_the_same_loss_and_grads(qwen):
    """MLP over token blocks inside compiled, checkpointed layers: the same function (fp32: the row
    blocks' matmuls may sum in another order, so closeness, not equality); 1 block restores it."""
    model, batch, chunked, l_eager, g_eager = _eager_reference(qwen, seed=2)
    compile_language_layers(chunked, model.vlm_family, backend="aot_eager")
    layers = language_layers(chunked, model.vlm_family)
    assert chunk_mlps(chunked, model.vlm_family, 3) == len(layers)
    mlp = layers[0].mlp
    rows = batch["input_ids"].numel()
    x = torch.randn(rows, model.config.text_config.hidden_size)
    inner, seen = mlp._vlm_mlp_forward, []
    mlp._vlm_mlp_forward = lambda t: (seen.append(t.shape[0]), inner(t))[1]
    with torch.no_grad():   # the split is real: 3 row blocks, concatenated back in order
        torch.testing.assert_close(mlp(x), inner(x), rtol=1e-5, atol=1e-6)
    mlp._vlm_mlp_forward = inner
    assert len(seen) == 3 and sum(seen) == rows, seen
    l_comp, g_comp = _loss_and_grads(chunked, batch)
    assert _graph_breaks() == 0
    assert l_comp == pytest.approx(l_eager, rel=1e-6)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_comp[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert chunk_mlps(chunked, model.vlm_family, 1) == len(layers) and mlp._vlm_mlp_chunks == 1
    with torch.no_grad():   # one block: the original forward runs
        assert torch.equal(mlp(x), mlp._vlm_mlp_forward(x))


def test_inductor_compiled_layers_match_eager(qwen):
    """The real backend (inductor, C++ on CPU): same loss, gradients within fused-op rounding."""
    model, batch, compiled, l_eager, g_eager = _eager_reference(qwen, seed=1)
    compile_language_layers(compiled, model.vlm_family)
    l_comp, g_comp = _loss_and_grads(compiled, batch)
    assert l_comp == pytest.approx(l_eager, rel=1e-5)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_comp[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_qlora_compiles_without_graph_breaks(tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    import vlm.kernels

    model, processor = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="bf16", device="cpu", quant="nf4")
    batch = _batch(processor)
    peft_model = _lora(model)
    rep = vlm.kernels.patch(peft_model, model.vlm_family, **kernel_patch_options(True))
    components = [model.vlm_family.component_of(name.removeprefix("base_model.model."))
                  for name, m in peft_model.named_modules()
                  if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")]
    assert {"language", "vision"} <= set(components), components   # the tiny tower is quantized too
    assert rep.counts["nf4_linear"] == len(components) and rep.counts["nf4_lora"] == 0
    l_eager, g_eager = _loss_and_grads(peft_model, batch, autocast=True)
    torch._dynamo.reset()
    compile_language_layers(peft_model, model.vlm_family, backend="aot_eager")
    assert batch_equal_images(peft_model, model.vlm_family) > 0   # the tower's blocks trace whole
    assert compile_vision_blocks(peft_model, model.vlm_family, backend="aot_eager") > 0
    l_comp, g_comp = _loss_and_grads(peft_model, batch, autocast=True)
    assert _graph_breaks() == 0
    assert l_comp == pytest.approx(l_eager, rel=1e-6)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_comp[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_int8w_layers_compile_without_graph_breaks(tiny_checkpoint):
    """The default ``dynamic`` policy stores protected groups as Int8Linear (vlm.quant.int8_linear):
    compiled decoder layers with LoRA on int8w and NF4 bases trace whole (its autograd Function
    included) and give the eager loss and gradients."""
    pytest.importorskip("bitsandbytes")
    from vlm.quant.int8_linear import int8w_layers

    model, processor = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="bf16", device="cpu",
                                quant={"preset": "dynamic", "budget": "1.1x"})
    assert any(".language_model." in n for n in int8w_layers(model)), int8w_layers(model)
    batch = _batch(processor)
    peft_model = _lora(model)
    l_eager, g_eager = _loss_and_grads(peft_model, batch, autocast=True)
    torch._dynamo.reset()
    compile_language_layers(peft_model, model.vlm_family, backend="aot_eager")
    l_comp, g_comp = _loss_and_grads(peft_model, batch, autocast=True)
    assert _graph_breaks() == 0
    assert l_comp == pytest.approx(l_eager, rel=1e-6)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_comp[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_qwen2_5_vl_tower_with_batched_windows_compiles_whole(tiny_checkpoint):
    """With equal windows (vlm.vision_attention) the Qwen2.5-VL blocks trace without a graph break
    and training gives the eager loss and gradients."""
    model, processor = vlm.load(tiny_checkpoint("qwen2_5_vl"), dtype="fp32", device="cpu")
    batch = _batch(processor)
    eager = _lora(model, seed=3)
    compiled = copy.deepcopy(eager)
    l_eager, g_eager = _loss_and_grads(eager, batch)
    torch._dynamo.reset()
    assert batch_equal_images(compiled, model.vlm_family) == model.config.vision_config.depth
    before = torch._dynamo.config.cache_size_limit
    n_lang = compile_language_layers(compiled, model.vlm_family, backend="aot_eager")
    n_vis = compile_vision_blocks(compiled, model.vlm_family, backend="aot_eager")
    assert n_vis == model.config.vision_config.depth
    # every compiled module is a cache entry on Module._call_impl: room for all + a recompile each
    assert torch._dynamo.config.cache_size_limit >= before + 2 * (n_lang + n_vis)
    l_comp, g_comp = _loss_and_grads(compiled, batch)
    assert _graph_breaks() == 0
    assert l_comp == pytest.approx(l_eager, rel=1e-6)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_comp[name], g, rtol=1e-5, atol=1e-7, msg=name)


def _two_image_batch(processor, image_token_id):
    """Two images of different sizes in a two-turn chat: mixed sizes are what make vision attention
    data-dependent (unequal segments) and what real datasets hold."""
    from PIL import Image, ImageDraw

    big = Image.new("RGB", (160, 96), (30, 60, 200))
    ImageDraw.Draw(big).rectangle([20, 12, 100, 60], fill=(220, 30, 30))
    small = Image.new("RGB", (40, 56), (20, 160, 40))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": big}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red box on blue."}]},
        {"role": "user", "content": [{"type": "image", "image": small}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a plain green card, taller than wide."}]},
    ]
    batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[labels == image_token_id] = -100
    batch["labels"] = labels
    return batch


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_family_compiles_without_graph_breaks_to_the_same_gradients(tiny_checkpoint, variant):
    """Decoder layers, then the frozen vision blocks the family names (batched vision attention where
    the tower allows it, as the fast path runs them), compile with zero graph breaks on two images of
    different sizes, to the eager model's loss and gradients."""
    model, processor = vlm.load(tiny_checkpoint(variant), dtype="fp32", device="cpu")
    cfg = model.config
    batch = _two_image_batch(processor, getattr(cfg, "image_token_id", None) or cfg.image_token_index)
    eager = _lora(model)
    compiled = copy.deepcopy(eager)
    l_eager, g_eager = _loss_and_grads(eager, batch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()   # reset() keeps counters: an earlier test's breaks
    batch_equal_images(compiled, model.vlm_family)   # as the fast path does, where the tower allows it
    compile_language_layers(compiled, model.vlm_family, backend="aot_eager")
    l_comp, g_comp = _loss_and_grads(compiled, batch)
    assert _graph_breaks() == 0, dict(torch._dynamo.utils.counters["graph_break"])
    assert l_comp == pytest.approx(l_eager, rel=1e-6)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_comp[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # then the frozen vision blocks: whole graphs too, the same numbers
    n_vis = compile_vision_blocks(compiled, model.vlm_family, backend="aot_eager")
    assert n_vis == len(vision_blocks(compiled, model.vlm_family)) > 0
    assert compile_vision_blocks(compiled, model.vlm_family, backend="aot_eager") == 0   # idempotent
    l_vis, g_vis = _loss_and_grads(compiled, batch)
    assert _graph_breaks() == 0, dict(torch._dynamo.utils.counters["graph_break"])
    assert l_vis == pytest.approx(l_eager, rel=1e-6)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_vis[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_full_mode_compiles_the_frozen_vision_blocks(tiny_checkpoint):
    """method: full on Qwen2-VL trains the merger, which lives inside the vision tower: the tower as a
    whole needs autograd, its frozen blocks do not (their inputs need no grad, so autograd records
    nothing there). fast_path compiles them as in a frozen tower (it kept the whole tower eager
    before); loss and every gradient equal the plain model's."""
    from transformers import AutoModelForImageTextToText

    from vlm.train import fast_path
    from vlm.train.config import parse_config
    from vlm.train.modes import prepare

    path = tiny_checkpoint("qwen2_vl")
    model, processor = vlm.load(path, dtype="fp32", device="cpu")
    family = model.vlm_family
    batch = _batch(processor)
    plain = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    for name, p in plain.named_parameters():        # what method: full trains, nothing wrapped
        p.requires_grad_(family.component_of(name.rsplit(".", 1)[0]) != "vision")
    l_ref, g_ref = _loss_and_grads(plain, batch)
    cfg = parse_config({"method": "full", "model": {"path": "x", "dtype": "fp32"}, "data": {"train": ["d.json"]},
                        "training": {"gradient_checkpointing": True, "lr": 1e-3}})
    prepare(model, family, cfg)
    blocks = family.component_roots(model, "vision")[0][1].blocks
    assert not fast_path.vision_trains(model, family)   # the trained merger does not count
    seen = []
    hook = blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    l_ours, g_ours = _loss_and_grads(model, batch)
    assert seen == [False]                              # the frozen block built no graph
    torch._dynamo.reset()
    assert batch_equal_images(model, family) > 0        # as fast_path.apply does first
    assert compile_vision_blocks(model, family, backend="aot_eager") == len(blocks)
    l_comp, g_comp = _loss_and_grads(model, batch)
    assert _graph_breaks() == 0
    assert seen == [False, False]
    for loss, grads in ((l_ours, g_ours), (l_comp, g_comp)):
        assert loss == pytest.approx(l_ref, rel=1e-6)
        assert grads.keys() == g_ref.keys() and any("merger" in n for n in grads)
        for name, g in g_ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
