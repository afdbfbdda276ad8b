"""A layer with planted activation outliers is protected by `dynamic`, not by `nf4`.

Plant: in decoder layer 1, input channels j of down_proj get 1000× larger activations (up_proj
rows j × 1000) while down_proj's columns j shrink 100× — the classic case where activation
outliers meet small weights: ‖W‖ barely changes (weight error stays ordinary), but NF4 rounds those
small columns to ~0 relative to their block's absmax, and they now carry most of the output.
"""

import shutil

import torch


def _planted(src, dst):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    mods = dict(model.named_modules())
    mlp = "model.language_model.layers.1.mlp"
    with torch.no_grad():
        for j in (5, 40, 77, 100):
            mods[f"{mlp}.up_proj"].weight[j] *= 1000.0
            mods[f"{mlp}.down_proj"].weight[:, j] /= 100.0
    shutil.copytree(src, dst)
    model.save_pretrained(dst)
    return f"{mlp}.down_proj"


def test_planted_activation_outliers_are_protected(tiny_checkpoint, tmp_path):
    from vlm.load import load

    planted = _planted(tiny_checkpoint("qwen2_vl"), tmp_path / "planted")
    dyn, _ = load(tmp_path / "planted", device="cpu", dtype="bf16", quant="dynamic")
    plan = dyn.vlm_quant_plan
    errs = plan.analysis["errors"]
    others = sorted(e["activation_error"] for n, e in errs.items() if n != planted)
    median = others[len(others) // 2]
    assert errs[planted]["activation_error"] > 5 * median
    assert errs[planted]["weight_error"] < 2 * median          # invisible to the weight error
    assert plan.layers[planted].precision == "bf16" and plan.layers[planted].reason == "protected"
    assert type(dict(dyn.named_modules())[planted]) is torch.nn.Linear

    nf4, _ = load(tmp_path / "planted", device="cpu", dtype="bf16", quant="nf4")
    assert nf4.vlm_quant_plan.layers[planted].precision == "nf4"
    import bitsandbytes as bnb
    assert isinstance(dict(nf4.named_modules())[planted], bnb.nn.Linear4bit)


def test_analysis_is_reproducible_for_a_seed(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm.families import family_for_config
    from vlm.quant.calibration import calibration_batches
    from vlm.quant.loading import analyse
    from vlm.quant.policy import QuantPolicy

    path = tiny_checkpoint("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
    proc = AutoProcessor.from_pretrained(path)
    fam = family_for_config(model.config)
    pol = QuantPolicy.parse({"preset": "dynamic", "max_rows": 16})
    runs = [analyse(model, fam, pol, calibration_batches(None, proc, n=2, seed=pol.seed)).analysis
            for _ in range(2)]
    assert runs[0]["errors"] == runs[1]["errors"]
    assert runs[0]["protected_groups"] == runs[1]["protected_groups"]
