"""Layers with planted activation outliers (vlm.quant.plants) are protected by `dynamic` under its
default budget, on any CPU; `nf4` leaves them quantized."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vlm.quant.plants import SITES, plant_outliers
from vlm.quant.sensitivity import OUTLIER_FACTOR


def _planted_checkpoint(src, dst, site):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    name = plant_outliers(model, site)
    shutil.copytree(src, dst)
    model.save_pretrained(dst)
    return name


def test_planted_activation_outliers_are_protected(tiny_checkpoint, tmp_path):
    from vlm.load import load

    planted = _planted_checkpoint(tiny_checkpoint("qwen2_vl"), tmp_path / "planted", "language_mlp")
    dyn, _ = load(tmp_path / "planted", device="cpu", dtype="bf16", quant="dynamic")
    plan = dyn.vlm_quant_plan
    errs = plan.analysis["errors"]
    others = sorted(e["activation_error"] for n, e in errs.items() if n != planted)
    median = others[len(others) // 2]
    assert errs[planted]["activation_error"] > 5 * median
    assert errs[planted]["weight_error"] < 2 * median          # invisible to the weight error
    assert planted in plan.analysis["outliers"]
    # int8 rounds the planted layer's small columns away too (test_int8_linear): 16-bit
    assert plan.layers[planted].precision == "bf16" and plan.layers[planted].reason == "protected"
    assert type(dict(dyn.named_modules())[planted]) is torch.nn.Linear
    assert plan.total_bytes() <= plan.analysis["budget_nf4"]["cap_bytes"]

    nf4, _ = load(tmp_path / "planted", device="cpu", dtype="bf16", quant="nf4")
    assert nf4.vlm_quant_plan.layers[planted].precision == "nf4"
    import bitsandbytes as bnb
    assert isinstance(dict(nf4.named_modules())[planted], bnb.nn.Linear4bit)


def _analysis(path, site, policy="dynamic"):
    """(planted name, dynamic plan) for the tiny model at ``path`` planted at ``site``, loaded in
    bf16 as ``vlm.load`` does before its analysis."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm.families import family_for_config
    from vlm.quant.calibration import calibration_batches
    from vlm.quant.loading import analyse
    from vlm.quant.policy import QuantPolicy

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    planted = plant_outliers(model, site)
    model.to(torch.bfloat16)
    pol = QuantPolicy.parse(policy)
    batches = calibration_batches(None, AutoProcessor.from_pretrained(path),
                                  n=pol.calibration_samples, seed=pol.seed)
    return planted, analyse(model, family_for_config(model.config), pol, batches)


@pytest.mark.parametrize("site", SITES)
def test_planted_outlier_is_protected_under_the_default_metric(tiny_checkpoint, site):
    """Every plant (language MLP, language attention, vision tower) is protected by the default
    `dynamic` policy, and its group score (the propagated error, vlm.quant.propagated) stands
    ≥ 10× the median by itself, not only through the local-outlier rule: the KL on this random
    model, which barely reads its vision tower, puts the vision plant at ~2× the median."""
    planted, plan = _analysis(tiny_checkpoint("qwen2_vl"), site)
    a = plan.analysis
    assert a["metric"] == "propagated"
    assert planted in a["outliers"], (a["outliers"], a["median_error"])
    assert a["errors"][planted]["activation_error"] >= 5 * a["median_layer_error"]
    assert a["errors"][planted]["block_error"] >= OUTLIER_FACTOR * a["median_error"] > 0
    assert plan.layers[planted].reason == "protected"
    assert plan.layers[planted].precision in ("bf16", "int8w")
    # the default budget: the whole planned model within 1.08 × its nf4-preset bytes, and the
    # bytes it spent are exactly what the plan weighs above NF4
    assert a["budget"] == "1.08x" and a["budget_spent"] <= a["budget_limit"]
    nf4 = a["budget_nf4"]["nf4_bytes"]
    assert plan.total_bytes() <= a["budget_nf4"]["cap_bytes"] == int(1.08 * nf4)
    assert a["extra_bytes"] == plan.total_bytes() - nf4 > 0


@pytest.mark.parametrize("site", ["language_attention", "language_mlp"])
def test_planted_outlier_is_protected_under_the_kl(tiny_checkpoint, site):
    planted, plan = _analysis(tiny_checkpoint("qwen2_vl"), site, {"preset": "dynamic", "metric": "output"})
    a = plan.analysis
    assert a["metric"] == "output" and a["errors"][planted]["block_error"] is None
    assert a["errors"][planted]["output_kl"] >= OUTLIER_FACTOR * a["median_error"]
    assert plan.layers[planted].reason == "protected"


_SUBPROCESS = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_outlier import _analysis
planted, plan = _analysis({path!r}, {site!r})
print("RESULT" + json.dumps({{"protected": sorted(n for n, l in plan.layers.items()
                                                if l.reason == "protected"),
                             "score": {{n: e["block_error"] for n, e in plan.analysis["errors"].items()}}}}))
"""


def test_plan_is_the_same_without_avx512(tiny_checkpoint):
    """The analysis runs in float32 from bitsandbytes' quantize/dequantize functions, so a CPU
    without AVX-512 (simulated: torch's, oneDNN's and MKL's instruction sets capped at AVX2 in a
    subprocess) gives the same protected set and the same group scores (the default metric's
    propagated errors) up to float32 noise."""
    path = str(tiny_checkpoint("qwen2_vl"))
    site = "vision_attention"
    planted, plan = _analysis(path, site)
    here = {"protected": sorted(n for n, l in plan.layers.items() if l.reason == "protected"),
            "score": {n: e["block_error"] for n, e in plan.analysis["errors"].items()}}
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", DNNL_MAX_CPU_ISA="AVX2",
               ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2", OMP_NUM_THREADS="1")
    code = _SUBPROCESS.format(tests=os.path.dirname(__file__), path=path, site=site)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.split("RESULT", 1)[1])
    assert there["protected"] == here["protected"]
    # scores far below the largest are at float32 noise: compared to 1 % of the largest; the rest
    # to 1 %.
    floor = 0.01 * max(here["score"].values())
    for n, score in here["score"].items():
        assert there["score"][n] == pytest.approx(score, rel=0.01, abs=floor), n


def test_analysis_is_reproducible_and_leaves_the_model_unchanged(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm.families import family_for_config
    from vlm.quant.calibration import calibration_batches
    from vlm.quant.loading import analyse
    from vlm.quant.policy import QuantPolicy

    path = tiny_checkpoint("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    proc = AutoProcessor.from_pretrained(path)
    fam = family_for_config(model.config)
    pol = QuantPolicy.parse({"preset": "dynamic", "max_rows": 16})
    runs = [analyse(model, fam, pol, calibration_batches(None, proc, n=2, seed=pol.seed)).analysis
            for _ in range(2)]
    assert runs[0]["errors"] == runs[1]["errors"]
    assert runs[0]["protected_groups"] == runs[1]["protected_groups"]
    assert all(e["block_error"] is not None for e in runs[0]["errors"].values())
    for r in runs:      # where the analysis time went, in the plan's record
        t = r["timing"]
        assert t["sensitivity"] == "propagated" and t["groups"] > 0 and t["calibration_batches"] == 2
        # sensitivity_s is kept to the ms (±0.5 ms over all groups), per_group_ms to 0.01 ms
        assert t["per_group_ms"] == pytest.approx(1e3 * t["sensitivity_s"] / t["groups"],
                                                  abs=0.5 / t["groups"] + 0.005)
        assert t["total_s"] >= t["capture_s"] + t["layer_errors_s"] + t["sensitivity_s"] - 1e-3
    for n, p in model.named_parameters():     # the fp32 analysis put every weight back exactly
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n
