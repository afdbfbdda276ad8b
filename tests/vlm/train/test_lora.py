"""LoRA target groups resolve through the family record; vLLM-unservable choices warn."""

import pytest

import vlm
from vlm.errors import ConfigError
from vlm.lora import apply_lora, resolve_targets, vllm_serving_warnings


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    model, _ = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="fp32", device="cpu")
    return model


def test_groups_resolve_to_language_linears_only(qwen):
    fam = qwen.vlm_family
    names = resolve_targets(qwen, fam, ["language.attention", "language.mlp"])
    assert names and all(fam.component_of(n) == "language" for n in names)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert leaves == set(fam.lora_attention + fam.lora_mlp)
    layers = qwen.config.text_config.num_hidden_layers
    assert len(names) == 7 * layers
    proj = resolve_targets(qwen, fam, ["projector"])
    assert proj and all(fam.component_of(n) == "projector" for n in proj)


def test_unknown_target_is_an_error(qwen):
    with pytest.raises(ConfigError, match="matches no linear module"):
        resolve_targets(qwen, qwen.vlm_family, ["no_such_proj"])


def test_vllm_warnings():
    fam = vlm.families.get_family("qwen2_vl")
    assert vllm_serving_warnings(fam, ["model.language_model.layers.0.self_attn.q_proj"], 16, []) == []
    w = vllm_serving_warnings(fam, ["lm_head"], 1024, ["lm_head"])
    assert any("rank 1024" in x for x in w)
    assert any("lm_head/embeddings" in x for x in w)
    assert any("modules_to_save" in x for x in w)


def test_apply_lora_trains_only_adapters(qwen):
    import copy

    peft_model = apply_lora(copy.deepcopy(qwen), qwen.vlm_family, r=8, alpha=16, warn=False)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def _tiny_batch(model, seed):
    """One random image-text sample for the tiny Qwen2-VL (grid 1×4×4 → 4 image tokens)."""
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    hi = min(100, cfg.text_config.vocab_size)
    ids = torch.cat([torch.randint(0, hi, (6,), generator=g), torch.tensor([cfg.vision_start_token_id]),
                     torch.full((4,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                     torch.randint(0, hi, (6,), generator=g)])[None]
    vc = cfg.vision_config
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    labels = ids.clone()
    labels[(ids == cfg.image_token_id)] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == cfg.image_token_id).long(),
            "pixel_values": torch.randn(16, patch, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]]),
            "labels": labels}


@pytest.mark.parametrize("gc", [False, True])
def test_frozen_vision_no_grad_same_loss_and_grads(qwen, gc):
    """The frozen tower under no_grad (and no input-grad hook on it) changes neither the loss nor the
    adapters' gradients; the tower keeps no autograd graph; LoRA on the tower turns it off."""
    import copy

    import torch

    torch.manual_seed(0)
    ref = apply_lora(copy.deepcopy(qwen), qwen.vlm_family, r=4, alpha=8, warn=False,
                     gradient_checkpointing=gc, frozen_vision_no_grad=False)
    torch.manual_seed(0)
    new = apply_lora(copy.deepcopy(qwen), qwen.vlm_family, r=4, alpha=8, warn=False,
                     gradient_checkpointing=gc)
    for m in (ref, new):   # LoRA B starts at 0: give it values so gradients reach every A
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(hash(n) % 2**31))
        m.train()
    batch = _tiny_batch(qwen, 3)
    seen = {}
    vis = new.get_base_model().model.visual

    def record(mod, inputs, out):
        seen.setdefault("grad", out.pooler_output.requires_grad)

    h = vis.register_forward_hook(record)
    # the first block's input: PEFT's input-grad hook on the patch embedding would mark it (a second
    # requires_grad variant for a compiled block) — apply_lora takes that hook off again
    def record_block0(mod, args):
        seen.setdefault("block0", args[0].requires_grad)

    h0 = vis.blocks[0].register_forward_pre_hook(record_block0)
    losses = []
    for m in (ref, new):
        loss = m(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    h.remove()
    h0.remove()
    assert seen["grad"] is False and seen["block0"] is False
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    g_new = {n: p.grad for n, p in new.named_parameters() if p.requires_grad}
    assert g_ref.keys() == g_new.keys() and all(g is not None for g in g_new.values())
    for n in g_ref:
        torch.testing.assert_close(g_new[n], g_ref[n], rtol=1e-5, atol=1e-7)


def test_lora_on_vision_keeps_its_graph(qwen):
    import copy

    peft_model = apply_lora(copy.deepcopy(qwen), qwen.vlm_family, r=4, alpha=8, warn=False,
                            targets=["vision", "language.attention"])
    peft_model.train()
    loss = peft_model(**_tiny_batch(qwen, 4)).loss
    loss.backward()
    vis_grads = [p.grad for n, p in peft_model.named_parameters()
                 if p.requires_grad and ".visual." in n]
    assert vis_grads and all(g is not None for g in vis_grads)


def test_skip_input_cast_under_autocast_is_bit_identical(qwen):
    """bf16 model, fp32 adapters, bf16 autocast: skipping PEFT's input cast changes no bit of the
    loss or the adapter gradients; without autocast PEFT's own cast still runs."""
    import copy

    import torch

    base = copy.deepcopy(qwen).to(torch.bfloat16)
    out = []
    for skip in (False, True):
        torch.manual_seed(0)
        m = apply_lora(copy.deepcopy(base), qwen.vlm_family, r=4, alpha=8, warn=False,
                       skip_cast_under_autocast=skip)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**_tiny_batch(qwen, 5)).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
        assert m(**_tiny_batch(qwen, 6)).loss.isfinite()   # no autocast: PEFT casts, still runs
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])
