"""vlm.kernels.patch on every zoo family's tiny model: same loss and gradients as the unpatched model
(fp32, CPU under TRITON_INTERPRET=1), each patched kernel really runs, idempotent, reversible."""

import pytest
import torch

import vlm.kernels as K
import importlib

P = importlib.import_module("vlm.kernels.patch")  # the name `vlm.kernels.patch` is the function

from kernel_tiny import batch_for, load_tiny

from vlm.families import family_for_config
from vlm.zoo import VARIANTS
# fp32 model; the kernels use fp32 math and the fused CE rounds nothing in fp32: observed worst
# relative gradient error ~6e-7. Per-parameter check: ‖g − g_ref‖ ≤ 1e-4·‖g_ref‖ + 1e-6·‖all grads‖
# (the absolute part covers analytically-zero gradients such as attention k_proj biases).
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-4, 1e-6


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.fixture
def count_calls(monkeypatch):
    calls = {"rms_norm": 0, "rope": 0, "swiglu": 0, "geglu": 0, "cross_entropy": 0}

    def wrap(mod, attr, key):
        fn = getattr(mod, attr)

        def counted(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        monkeypatch.setattr(mod, attr, counted)

    import vlm.kernels.fused_linear_cross_entropy as F
    import vlm.kernels.geglu as G
    import vlm.kernels.rms_norm as R
    import vlm.kernels.rope as Ro
    import vlm.kernels.swiglu as S
    wrap(R, "rms_norm", "rms_norm")
    wrap(Ro, "rope", "rope")
    wrap(S, "swiglu", "swiglu")
    wrap(G, "geglu", "geglu")
    wrap(F, "fused_linear_cross_entropy", "cross_entropy")
    return calls


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patched_equals_unpatched(variant, tiny_checkpoint, count_calls):
    model, proc = load_tiny(tiny_checkpoint(variant))
    family = family_for_config(model.config)
    model.train()
    batch = batch_for(model, proc)
    ref_out, ref = _loss_and_grads(model, batch)

    keys = list(model.state_dict())
    rep = K.patch(model, family)
    # the patched model saves as the original: same state-dict keys (no swapped-out module's copy of a
    # weight: save_pretrained refuses such shared tensors, FSDP would see one parameter twice)
    assert list(model.state_dict()) == keys
    layers = model.config.get_text_config().num_hidden_layers
    assert rep.counts["rms_norm"] >= 2 * layers + 1
    mlp, other_mlp = (("geglu", "swiglu") if family.language_kernels.mlp_activation == "gelu_tanh"
                      else ("swiglu", "geglu"))
    assert rep.counts[mlp] == layers and rep.counts[other_mlp] == 0
    assert rep.counts["rope"] >= 1 and rep.counts["cross_entropy"] == 1
    # every kind that patched nothing says why (the MLP kernel that does not apply included)
    assert all(kind in rep.skipped for kind, n in rep.counts.items() if n == 0), rep
    assert other_mlp in rep.skipped and "activation" in rep.skipped[other_mlp]
    if variant == "mllama":
        assert "rope" in rep.skipped  # cross-attention layers have no rotary: reported, not patched
    out, grads = _loss_and_grads(model, batch)
    del count_calls[other_mlp]
    assert all(count_calls[k] > 0 for k in count_calls), count_calls
    assert out.logits is None
    assert abs(out.loss.item() - ref_out.loss.item()) <= LOSS_RTOL * abs(ref_out.loss.item())
    assert grads.keys() == ref.keys()
    scale = torch.sqrt(sum((g.double() ** 2).sum() for g in ref.values())).item()
    for n, g in grads.items():
        err = (g - ref[n]).norm().item()
        assert err <= GRAD_RTOL * ref[n].norm().item() + GRAD_ATOL * scale, (n, err, ref[n].norm().item())

    # idempotent: a second patch changes nothing
    again = K.patch(model)
    assert again.already_patched and again.counts == rep.counts
    # eval mode keeps HF's logits path
    model.eval()
    with torch.no_grad():
        ev = model(**batch)
    assert ev.logits is not None and abs(ev.loss.item() - ref_out.loss.item()) < 1e-4

    # unpatch restores the original modules and forwards
    K.unpatch(model)
    assert not K.is_patched(model)
    assert not any(isinstance(m, P.TritonRMSNorm) for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    model.train()
    out2, _ = _loss_and_grads(model, batch)
    assert out2.logits is not None and out2.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-6)


def test_disabled_flag_patches_nothing(tiny_checkpoint):
    model, _ = load_tiny(tiny_checkpoint("qwen2_vl"))
    K.patch(model, family_for_config(model.config))
    rep = K.patch(model, enabled=False)
    assert rep.total == 0 and "all" in rep.skipped and not K.is_patched(model)


def test_rope_dispatcher_leaves_unpatched_models_alone(tiny_checkpoint, count_calls):
    a, proc = load_tiny(tiny_checkpoint("llava"))
    b, _ = load_tiny(tiny_checkpoint("llava"))
    batch = batch_for(a, proc)
    K.patch(a, family_for_config(a.config))
    try:
        with torch.no_grad():
            b(**batch)
        assert count_calls["rope"] == 0   # b shares the modeling module but is not patched
        with torch.no_grad():
            a.eval()(**batch)
        assert count_calls["rope"] > 0
    finally:
        K.unpatch(a)


def test_nf4_lora_patch_matches_peft(tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    path = tiny_checkpoint("qwen2_vl")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                           llm_int8_skip_modules=["model.visual", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                        dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(path)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                     target_modules=r".*language_model.*\.(q_proj|v_proj|gate_proj|down_proj)")
    model = get_peft_model(model, cfg)
    with torch.no_grad():   # LoRA B starts at zero: make the adapter path matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.train()
    batch = batch_for(model, proc)
    ref_out, ref = _loss_and_grads(model, batch)
    rep = K.patch(model, family_for_config(model.config))
    assert rep.counts["nf4_lora"] == 4 * model.config.get_text_config().num_hidden_layers
    out, grads = _loss_and_grads(model, batch)
    assert abs(out.loss.item() - ref_out.loss.item()) <= LOSS_RTOL * abs(ref_out.loss.item())
    assert grads.keys() == ref.keys() and all("lora_" in n for n in grads)
    scale = torch.sqrt(sum((g.double() ** 2).sum() for g in ref.values())).item()
    for n, g in grads.items():
        err = (g - ref[n]).norm().item()
        assert err <= GRAD_RTOL * ref[n].norm().item() + GRAD_ATOL * scale, (n, err)
    K.unpatch(model)
    assert not K.is_patched(model)


@pytest.mark.parametrize("forward_caps", [False, True])
def test_soft_capped_logits_patched_equals_unpatched(tiny_checkpoint, forward_caps):
    """A Gemma 3 config with final_logit_softcapping set. Gemma3ForConditionalGeneration ignores it,
    so the fused CE must too (the family says so); a model whose forward caps (here: the same model
    with its lm_head output capped, and a family record that says so) gets a capped fused CE. Loss
    and gradients equal the unpatched model's either way."""
    import dataclasses

    model, proc = load_tiny(tiny_checkpoint("gemma3"))
    cap = 0.5   # tiny logits are ~±1: the cap changes the loss
    model.config.get_text_config().final_logit_softcapping = cap
    family = family_for_config(model.config)
    if forward_caps:
        family = dataclasses.replace(family, language_kernels=dataclasses.replace(
            family.language_kernels, logit_softcapping=True))
        # HF's capping forward, simulated: cap the logits (not the hidden states the patched
        # lm_head passes through to the fused CE)
        model.lm_head.register_forward_hook(
            lambda m, i, out: out if getattr(m, "_vlm_passthrough", False) else torch.tanh(out / cap) * cap)
    model.train()
    batch = batch_for(model, proc)
    ref_out, ref = _loss_and_grads(model, batch)
    rep = K.patch(model, family)
    note = "soft-caps logits at 0.5" if forward_caps else "does not apply it"
    assert any(note in n for n in rep.notes), rep
    out, grads = _loss_and_grads(model, batch)
    assert abs(out.loss.item() - ref_out.loss.item()) <= LOSS_RTOL * abs(ref_out.loss.item())
    scale = torch.sqrt(sum((g.double() ** 2).sum() for g in ref.values())).item()
    for n, g in grads.items():
        err = (g - ref[n]).norm().item()
        assert err <= GRAD_RTOL * ref[n].norm().item() + GRAD_ATOL * scale, (n, err)
    K.unpatch(model)
