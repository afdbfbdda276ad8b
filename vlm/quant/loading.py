"""Load a checkpoint with a quantization policy; save it so plain ``from_pretrained`` reloads it.

``load_quantized`` (called by ``vlm.load(path, quant=...)``):

1. parse the policy (preset name / dict / YAML path / QuantPolicy);
2. plan: a static policy resolves against a meta-device skeleton (no weights read); a dynamic one
   loads the 16-bit weights once on ``device``, measures every candidate layer on calibration
   batches (vlm.quant.sensitivity) and protects the worst under the budget, then frees them;
3. load through transformers + bitsandbytes with a ``BitsAndBytesConfig`` whose
   ``llm_int8_skip_modules`` is ONE merged pattern of the 16-bit linears (plan.skip_pattern: one
   regex for transformers to try per module, not one per kept layer), then write into the saved
   config the explicit list: every 16-bit linear by full name (plan.skip_modules) plus vLLM's
   names for them; check that the set of bitsandbytes layers equals the plan (a mismatch is an
   error, never a silent difference); every 4-bit layer takes bitsandbytes'
   portable CPU path, whatever the CPU (vlm.quant.cpu_path);
4. record the policy, the plan and the analysis in ``model.config.vlmtune["quant"]``: it rides in
   config.json next to the standard ``quantization_config`` when the model is saved.

Storage type: one of nf4/fp4/int8 per model, the rest 16-bit in the load dtype (bf16/fp16 in a
policy both mean "not quantized"), except layers planned ``int8w``: loaded 16-bit by transformers
(skip list), then swapped to vlm.quant.int8_linear.Int8Linear.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import torch

from vlm.errors import VlmError
from vlm.quant import plan_cache
from vlm.quant.calibration import calibration_batches
from vlm.quant.cpu_path import use_portable_cpu_path
from vlm.quant.plan import QuantPlan, quantizable_linears, resolve_plan
from vlm.quant.int8_linear import dequantized_linears, int8w_layers, quantize_int8w
from vlm.quant.policy import FOUR_BIT, INT8W, QUANTIZED, QuantPolicy
from vlm.quant.sensitivity import GROUP_FIELDS, choose_protected, choose_tiers, measure, timing_line
from vlm.quant.vllm_names import vllm_skip_names


def meta_model(config, dtype: torch.dtype = torch.bfloat16):
    """The model's module tree on the meta device (names and shapes, no memory)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def analyse(model, family, policy: QuantPolicy, batches: list[dict] | None, *,
            measure_all: bool = False) -> QuantPlan:
    """Plan for a loaded 16-bit ``model``; runs the sensitivity analysis when the policy asks.

    ``measure_all``: measure every quantizable linear (as if stored in the policy's quantized type,
    nf4 when it has none), not only the analysis' candidates (used by the quant report).
    """
    base = resolve_plan(policy, model, family)
    kind = base.quant_kind or "nf4"
    if measure_all:
        names = {n: (lp.precision if lp.precision in QUANTIZED else kind) for n, lp in base.layers.items()}
    elif policy.sensitivity:
        names = {n: lp.precision for n, lp in base.layers.items()
                 if lp.precision in QUANTIZED and lp.reason == "component"}
    else:
        return base
    group_metric = policy.metric if policy.metric in GROUP_FIELDS else None
    timing: dict = {}
    errors = measure(model, names, batches, double_quant=policy.double_quant,
                     max_rows=policy.max_rows, seed=policy.seed,
                     sensitivity=group_metric or ("output" if measure_all else None),
                     fp32=policy.analysis_dtype == "fp32", extend=policy.propagate_blocks,
                     timing=timing)
    if not policy.sensitivity:
        return resolve_plan(policy, model, family, analysis={"errors": errors, "timing": timing})
    if INT8W in policy.tiers:   # the same measurement with the candidates stored int8w
        tier_timing: dict = {}
        int8w_errors = measure(model, dict.fromkeys(names, INT8W), batches, double_quant=policy.double_quant,
                               max_rows=policy.max_rows, seed=policy.seed, sensitivity=group_metric,
                               fp32=policy.analysis_dtype == "fp32", extend=policy.propagate_blocks,
                               timing=tier_timing)
        timing["int8w_total_s"] = tier_timing["total_s"]
        timing["total_s"] = round(timing["total_s"] + tier_timing["total_s"], 3)
        t = time.perf_counter()
        protected, analysis = choose_tiers(base, errors, {INT8W: int8w_errors}, budget=policy.budget,
                                           metric=policy.metric, tiers=policy.tiers)
    else:
        t = time.perf_counter()
        protected, analysis = choose_protected(base, errors, budget=policy.budget, metric=policy.metric)
    timing["ranking_s"] = round(time.perf_counter() - t, 3)
    analysis["errors"] = errors
    analysis["timing"] = timing
    return resolve_plan(policy, model, family, protected=protected, analysis=analysis)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.3f} MiB"


def budget_line(plan: QuantPlan) -> str:
    """What the protection was allowed and what the plan weighs; says so when the policy's own
    16-bit layers (dynamic: projector, lm_head) already exceed an ``NF4Multiple`` cap."""
    a = plan.analysis
    cap = a.get("budget_nf4")
    if not cap:
        return (f"quant: budget {a.get('budget')} ({a.get('budget_unit')}): spent {a.get('budget_spent', 0):.0f} "
                f"of {a.get('budget_limit', 0):.0f}; plan {_size(plan.total_bytes())}")
    line = (f"quant: budget {a['budget']} of the nf4 bytes ({_size(cap['nf4_bytes'])}): cap "
            f"{_size(cap['cap_bytes'])}, plan {_size(plan.total_bytes())}")
    if cap["floor_over_cap_bytes"]:
        line += (f"; warning: the layers the policy keeps 16-bit by component already take "
                 f"{cap['floor_over_cap_bytes'] / 2**20:.1f} MiB more than the cap, so the analysis "
                 f"protected nothing (raise the budget, or quantize them: e.g. projector: nf4)")
    return line


def bnb_config(plan: QuantPlan, dtype: torch.dtype, quant_storage: torch.dtype | None = None):
    """The BitsAndBytesConfig that quantizes exactly ``plan.quantized()``.

    ``quant_storage``: the dtype 4-bit weights are packed into (default uint8, bitsandbytes' own).
    FSDP shards only floating tensors and needs one dtype per shard group, so QLoRA under FSDP
    packs them into the compute dtype (a bf16 element holds four 4-bit values); the
    values and the checkpoint's meaning are unchanged.
    """
    from transformers import BitsAndBytesConfig

    kind = plan.quant_kind
    skip = plan.skip_modules()
    vllm, partial = vllm_skip_names(plan.family, plan.kept())
    # vLLM's names go in the same list when transformers would read none of them as a quantized
    # layer (they are usually no HF name at all; otherwise they name the same kept layer).
    from vlm.quant.plan import names_text, skipped_by

    quantized = names_text(plan.quantized())
    vllm_ok = [v for v in vllm if not skipped_by(v, quantized)]
    plan.analysis["vllm"] = {"skip_modules": vllm_ok, "not_skippable_alone": partial}
    names = skip + [v for v in vllm_ok if v not in skip]
    if kind in FOUR_BIT:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                  bnb_4bit_use_double_quant=plan.policy.double_quant,
                                  bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=quant_storage or torch.uint8,
                                  llm_int8_skip_modules=names)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=names)
    raise VlmError("bnb_config: the plan quantizes nothing")


def bnb_layer_names(model) -> dict[str, str]:
    """Full names of bitsandbytes layers in ``model`` → 'nf4'/'fp4'/'int8'."""
    import bitsandbytes as bnb

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out[n] = getattr(m.weight, "quant_type", None) or "nf4"
        elif isinstance(m, bnb.nn.Linear8bitLt):
            out[n] = "int8"
    return out


def verify(model, plan: QuantPlan) -> None:
    """The bitsandbytes and int8w layers of ``model`` must be exactly the plan's quantized layers."""
    got = bnb_layer_names(model) | dict.fromkeys(int8w_layers(model), INT8W)
    want = {n: plan.layers[n].precision for n in plan.quantized() + plan.int8w()}
    if got != want:
        extra = sorted(set(got) - set(want))[:3]
        missing = sorted(set(want) - set(got))[:3]
        wrong = sorted(n for n in set(got) & set(want) if got[n] != want[n])[:3]
        raise VlmError(f"quantized layers differ from the plan: unexpectedly quantized {extra}, "
                       f"not quantized {missing}, wrong type {wrong}")


def _metadata(plan: QuantPlan) -> dict[str, Any]:
    meta = plan.to_json()
    errs = meta.get("analysis", {}).get("errors")
    if errs:  # compact: name -> [weight_error, activation_error, output_kl, block_error]
        meta["analysis"] = dict(meta["analysis"])
        meta["analysis"]["errors"] = _compact(errs)
        if meta["analysis"].get("tier_errors"):
            meta["analysis"]["tier_errors"] = {t: _compact(e) for t, e in meta["analysis"]["tier_errors"].items()}
    return meta


def _compact(errs: dict[str, dict]) -> dict[str, list]:
    return {n: [_round(e["weight_error"]), _round(e["activation_error"]), _round(e.get("output_kl")),
                _round(e.get("block_error"))] for n, e in errs.items()}


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


def attach_metadata(model, plan: QuantPlan) -> None:
    """``model.config.vlmtune["quant"]`` = policy, counts, protected layers, analysis."""
    vt = dict(getattr(model.config, "vlmtune", None) or {})
    vt["quant"] = _metadata(plan)
    model.config.vlmtune = vt
    model.vlm_quant_plan = plan


def quant_metadata(model) -> dict[str, Any] | None:
    """What :func:`attach_metadata` recorded (policy, counts, protected layers), or None for a
    16-bit model; ``model`` may be a PEFT wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return (getattr(model.config, "vlmtune", None) or {}).get("quant")


def load_quantized(source: str, *, config=None, family=None, quant: Any, dtype: torch.dtype,
                   device: str | torch.device, calibration: Any = None, processor=None,
                   budget: Any = None, quant_storage: torch.dtype | None = None):
    """``vlm.load``'s quantized path; see the module docstring. Returns the model.

    ``quant_storage``: see ``bnb_config`` (the compute dtype for QLoRA under FSDP)."""
    from transformers import AutoModelForImageTextToText

    from vlm.families import family_for_config
    from vlm.load import load_config

    config = config if config is not None else load_config(source)
    family = family if family is not None else family_for_config(config)
    policy = QuantPolicy.parse(quant, budget=budget)
    device = str(device)
    if policy.quant_kind is None:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(device)
        plan = resolve_plan(policy, model, family)
        quantize_int8w(model, plan.int8w())
        verify(model, plan)
        attach_metadata(model, plan)
        return model
    cache_key = plan_cache.key(source, policy, calibration, dtype) if policy.sensitivity else None
    cached = plan_cache.read(cache_key)
    if cached is not None:
        tiers = dict.fromkeys(cached["protected"], "bf16") | dict.fromkeys(cached.get("protected_int8w", []), INT8W)
        plan = resolve_plan(policy, meta_model(config, dtype), family, protected=tiers,
                            analysis=cached.get("analysis"))
        print(f"quant: {policy.name} plan from the analysis cache ({len(cached['protected'])} layers kept "
              f"16-bit, {len(cached.get('protected_int8w', []))} int8w; {plan_cache.cache_root() / cache_key}.json; "
              "VLM_QUANT_PLAN_CACHE=0 re-analyses)")
    elif policy.sensitivity:
        model16 = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, device_map=device)
        batches = calibration_batches(calibration, processor, n=policy.calibration_samples,
                                      seed=policy.seed)
        plan = analyse(model16, family, policy, batches)
        print(f"quant: {policy.name} (metric {policy.metric}) "
              f"{timing_line(plan.analysis['timing'])}; {len(plan.kept()) - len(plan.int8w())} linears "
              f"kept 16-bit" + (f", {len(plan.int8w())} int8w" if INT8W in policy.tiers else ""))
        print(budget_line(plan))
        del model16
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        written = plan_cache.write(cache_key, plan)
        if written is not None:
            print(f"quant: plan cached in {written} (the next load of this checkpoint with this calibration "
                  "and policy skips the analysis)")
    else:
        plan = resolve_plan(policy, meta_model(config, dtype), family)
    if plan.quant_kind is None:
        # the analysis protected every candidate (a budget as large as the model): nothing for
        # bitsandbytes, the int8w layers are swapped in after a 16-bit load
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, device_map=device)
        quantize_int8w(model, plan.int8w())
        verify(model, plan)
        attach_metadata(model, plan)
        return model
    qconfig = bnb_config(plan, dtype, quant_storage)
    saved_skip = qconfig.llm_int8_skip_modules
    # Load with the kept layers as one merged pattern (plan.skip_pattern): transformers tries every
    # key as a regex against every module name, so the explicit list cost one regex per pair
    # (62 s for a Qwen2-VL-7B plan). The explicit list is what config.json keeps: plain
    # transformers and vLLM read names, not our pattern. verify() checks the result either way.
    qconfig.llm_int8_skip_modules = plan.skip_pattern()
    model = AutoModelForImageTextToText.from_pretrained(
        source, quantization_config=qconfig, dtype=dtype, device_map=device)
    model.config.quantization_config.llm_int8_skip_modules = saved_skip
    use_portable_cpu_path(model)   # same numbers on every CPU; no repack crash (vlm.quant.cpu_path)
    quantize_int8w(model, plan.int8w())   # transformers loaded them 16-bit (skip list)
    verify(model, plan)
    attach_metadata(model, plan)
    return model


def save_quantized(model, out_dir: str | os.PathLike, processor=None) -> Path:
    """Write ``model`` (and ``processor``) to ``out_dir`` atomically: a sibling temp folder, then
    a rename. config.json carries ``quantization_config`` and ``vlmtune.quant``.

    int8w layers are written as ordinary 16-bit linears holding their dequantized weights Ŵ (in
    the skip list: plain transformers loads them as such and computes what this model computes);
    ``vlm.load(out, quant=policy_from_record(config.vlmtune.quant))`` stores them int8w again with
    the same codes (vlm.quant.int8_linear)."""
    from vlm.atomic import replacing_folder

    out = Path(out_dir)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    with replacing_folder(out) as tmp, dequantized_linears(model, dtype):
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
    return out


__all__ = ["analyse", "attach_metadata", "quant_metadata", "bnb_config", "bnb_layer_names", "load_quantized",
           "meta_model", "save_quantized", "verify", "quantizable_linears"]
