"""Dynamic load → save → plain from_pretrained → same layers and logits; QLoRA trains on top;
the simulated quantization used by the agreement check equals the real bitsandbytes forward."""

import json

import torch

from vlm.quant.calibration import calibration_batches


def test_save_reload_lora_and_simulation(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlm.load import load
    from vlm.quant.agreement import simulated
    from vlm.quant.cpu_path import use_portable_cpu_path
    from vlm.quant.loading import bnb_layer_names, save_quantized

    path = tiny_checkpoint("qwen2_vl")
    model, processor = load(path, device="cpu", dtype="bf16", quant="dynamic")
    plan = model.vlm_quant_plan
    assert plan.analysis["protected_groups"], "the default budget protects something"
    out = save_quantized(model, tmp_path / "q", processor)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    meta = cfg["vlmtune"]["quant"]
    assert meta["policy"]["name"] == "dynamic" and sorted(meta["protected"] + meta["protected_int8w"]) == sorted(
        n for n, lp in plan.layers.items() if lp.reason == "protected")
    assert meta["protected_int8w"] == sorted(plan.int8w()) and meta["policy"]["budget"] == "1.08x"

    reloaded = AutoModelForImageTextToText.from_pretrained(out, device_map="cpu")
    # plain transformers keeps bitsandbytes' machine-dependent CPU path; vlm.load picks the portable one
    use_portable_cpu_path(reloaded)
    assert bnb_layer_names(reloaded) == bnb_layer_names(model)
    assert sorted(bnb_layer_names(model)) == sorted(plan.quantized())
    batch = calibration_batches(None, processor, n=1, seed=3)[0]
    with torch.no_grad():
        a, b = model(**batch).logits, reloaded(**batch).logits
    assert torch.equal(a, b)

    # simulated deq(q(W)) on the 16-bit model ≈ the real Linear4bit forward
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
    with simulated(ref, {n: lp.precision for n, lp in plan.layers.items()}), torch.no_grad():
        sim = ref(**batch).logits
    assert (sim.float() - a.float()).abs().max() < 0.05 * a.float().abs().max()

    # QLoRA: a backward step reaches the adapters on top of the 4-bit base
    peft_model = get_peft_model(reloaded, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
