"""Per-component quantization policies and sensitivity analysis (issue #4).

    from vlm.quant import QuantPolicy, load_quantized, save_quantized
    model, processor = vlm.load(path, quant="dynamic")          # or "nf4", a dict, a YAML path
    model.vlm_quant_plan            # QuantPlan: precision of every linear, by full name
    model.config.vlmtune["quant"]   # policy + plan + analysis, saved in config.json
    save_quantized(model, out_dir, processor)   # reloads with plain from_pretrained

Files: policy.py (what), plan.py (where, per full module name), metrics.py (error math, bytes),
capture.py (calibration inputs in one pass), sensitivity.py (output KL per layer, rank and
protect; ``choose_tiers``: nf4 / int8w / 16-bit per group), int8_linear.py (the int8w tier's layer), calibration.py (batches), loading.py (bitsandbytes load/save), vllm_names.py (skip names
vLLM reads), agreement.py and report.py (``vlm quant-report``), plants.py (planted outliers that
tests and benchmarks/quant_policies.py check the analysis with).
"""

from vlm.quant.policy import PRECISIONS, PRESETS, QuantPolicy, load_policy, parse_budget

__all__ = ["PRECISIONS", "PRESETS", "QuantPolicy", "load_policy", "parse_budget",
           "load_quantized", "save_quantized", "resolve_plan", "QuantPlan"]


def __getattr__(name):  # lazy: loading pulls in transformers/bitsandbytes
    if name in ("load_quantized", "save_quantized"):
        from vlm.quant import loading

        return getattr(loading, name)
    if name in ("resolve_plan", "QuantPlan"):
        from vlm.quant import plan

        return getattr(plan, name)
    raise AttributeError(name)
