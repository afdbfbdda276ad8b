"""``quant_storage``: 4-bit weights packed in a floating dtype (what QLoRA under FSDP needs) hold
the same values: same logits as bitsandbytes' uint8 storage, LoRA trains on top, and the setting
rides in config.json's quantization_config."""

from __future__ import annotations

import torch

import vlm


def _inputs(processor, family):
    from PIL import Image

    img = Image.new("RGB", (56, 56), (200, 30, 30))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return processor(text=[text], images=[img], return_tensors="pt")


def test_float_quant_storage_same_logits_and_trains(tiny_checkpoint, tmp_path):
    import bitsandbytes as bnb

    ck = tiny_checkpoint("qwen2_vl")
    ref, processor = vlm.load(ck, dtype="fp32", device="cpu", quant="nf4")
    model, _ = vlm.load(ck, dtype="fp32", device="cpu", quant="nf4", quant_storage="fp32")
    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four and all(m.weight.dtype == torch.float32 for m in four), "4-bit weights packed in fp32"
    assert all(m.weight.dtype == torch.uint8 for m in ref.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert model.config.quantization_config.to_dict()["bnb_4bit_quant_storage"] == "float32"

    batch = _inputs(processor, model.vlm_family)
    with torch.no_grad():
        a = ref(**batch).logits
        b = model(**batch).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)   # same packed bits, same dequantized values

    from vlm.lora import apply_lora

    peft = apply_lora(model, model.vlm_family, r=4, alpha=8, dropout=0.0,
                      targets=["language.attention", "language.mlp"], modules_to_save=[],
                      use_rslora=False, gradient_checkpointing=False)
    out = peft(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
