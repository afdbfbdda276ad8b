"""Sensitivity analysis: measure what each layer's quantization does to the model, protect the worst.

1. ``measure`` (all in float32: the model's 16-bit weights are upcast in place for the analysis and
   put back bit-exactly after, so the numbers do not depend on a CPU's or GPU's bf16 arithmetic):

   - per layer, with Ŵ = deq(q(W)) from bitsandbytes' quantize/dequantize functions (never a
     ``Linear4bit`` forward, whose CPU path differs between machines) and X its captured
     calibration inputs (vlm.quant.capture):
         e_w = ‖W − Ŵ‖/‖W‖            e_a = ‖XWᵀ − XŴᵀ‖/‖XWᵀ‖        (vlm.quant.metrics)
   - per fused-sibling group g (q/k/v, gate/up: vLLM serves them as one layer, so they are
     protected together), with ONLY g quantized, one of two group measurements:
       ``propagated`` (the default, vlm.quant.propagated): the error g leaves in the residual
         stream three blocks past its own (``propagate: k``: k blocks; ``propagate: end``: at
         the input of the language model's or vision tower's final norm), relative to it, per
         token, from cached block inputs (only those blocks run):
             E_g = mean_t ‖ĥ_t − h_t‖² / ‖h_t‖²
         Cost: one reference forward, then per group and batch 4 blocks (Qwen2-VL-7B: ~1/15 of
         the KL's whole-model forwards; the vision tower's groups never run the language model
         or the lm_head); ``propagate: 0``: one block per group.
       ``output``: the KL of the next-token distribution against the 16-bit model's on the
         calibration batches (p = softmax of the 16-bit logits, q = with g quantized, mean over
         every non-padding position t):
             KL_g = mean_t Σ_v p_v (log p_v − log q_v)
         Cost: one reference forward, then one whole-model forward per group and batch
         (quantize-dequantize the group's weights in place, forward, restore): for Qwen2-VL-7B
         ~240 × 4 forwards, ~310 s of a 390 s cold start on an H200.
     At equal bytes both rank as well (benchmarks/results/quant_policies_*: the same KL gap closed
     at 1.15× NF4 on the demo base, and every planted outlier protected by both).

2. ``choose_protected`` (``tiers: [bf16]``): a group's score s_g is E_g (``metric: propagated``, the default), KL_g
   (``metric: output``), or Σ e_a / Σ e_w of its members (``metric: activation`` / ``weight``,
   the older rankings). Protecting g
   costs S_g = Σ (bytes16 − bytesQ) of its members. Order:
     a. local outliers: groups with a member whose own error (e_a; e_w where it never ran) is
        ≥ LOCAL_OUTLIER_FACTOR × the median layer error: NF4 destroys most of that layer's
        output, whatever the calibration logits say (a random or image-blind model barely reads
        a vision layer, a trained one may on other images); largest own error first (the KL on
        calibration data can misjudge them: benchmarks/results/quant_policies_*.md);
     b. score outliers: groups with s_g ≥ OUTLIER_FACTOR × median(s), largest s_g first.
        A layer whose error stands far above the rest is never left quantized for marginal gains
        on small layers while the budget can hold it;
     c. then the rest by s_g / S_g (score per byte saved), ties by name.
   Each group is protected when it still fits the budget (a fraction f: protected parameters ≤ f ×
   candidate parameters; bytes B: Σ S_g ≤ B; a multiple r of the NF4 bytes, ``NF4Multiple``:
   Σ S_g ≤ r · bytes_nf4 − bytes_floor, so the whole plan ≤ r · bytes_nf4), else skipped and the
   next one tried. The analysis
   records what the protection costs in bytes either way (``extra_bytes``).

3. ``choose_tiers`` (``tiers: [int8w, bf16]``, the default): the same outlier rules (largest
   group score first), then per group nf4 / int8w
   (vlm.quant.int8_linear) / 16-bit by measured error removed per extra byte; see its docstring.

Deterministic given the errors; the errors are reproducible for a seed and a calibration set.
``measure(timing=...)`` records where the analysis time went (capture, per-layer errors, group
sensitivity, per group); ``vlm load`` prints it (``timing_line``) and the plan keeps it.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vlm.quant.agreement import simulated
from vlm.quant.capture import capture_inputs, move_batch
from vlm.quant.metrics import activation_error, dequantized, weight_error
from vlm.quant.plan import QuantPlan, group_key
from vlm.quant.policy import DEFAULT_PROPAGATE, QUANTIZED, NF4Multiple
from vlm.quant.propagated import propagated_sensitivity

OUTLIER_FACTOR = 10.0     # score outlier: the group's score is ≥ 10 × the median group score
LOCAL_OUTLIER_FACTOR = 5.0  # local outlier: a member's own error is ≥ 5 × the median layer error


@contextmanager
def upcast(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Floating parameters in float32 for the duration; each put back in its own dtype after.

    bf16/fp16 → fp32 → bf16/fp16 is exact, so the model leaves unchanged. Memory: the fp32 copy
    replaces the 16-bit one parameter by parameter (2× the 16-bit weights at most)."""
    saved = []
    if enabled:
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != torch.float32:
                    saved.append((p, p.dtype))
                    p.data = p.data.float()
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, dtype in saved:
                p.data = p.data.to(dtype)


def measure(model: nn.Module, names: dict[str, str], batches: list[dict] | None, *,
            double_quant: bool = True, max_rows: int = 256, seed: int = 0,
            sensitivity: str | None = "propagated", fp32: bool = True, mode: str = "isolated",
            extend: int | None = DEFAULT_PROPAGATE, timing: dict | None = None) -> dict[str, dict]:
    """Errors of each layer ``name`` quantized to ``names[name]``.

    → {name: {precision, weight_error, activation_error, rows, output_kl, block_error, group}};
    ``sensitivity`` picks the group measurement: "propagated" fills ``block_error`` (E_g,
    vlm.quant.propagated), "output" fills ``output_kl`` (KL_g), None neither. Both are those of
    the layer's fused-sibling group (None without calibration batches, or for a layer whose
    weight is tied to the input embeddings). ``extend``: blocks measured past the group's own
    (None: to the end of its stack; vlm.quant.propagated). ``timing`` (a dict) receives where the time went:
    capture_s, layer_errors_s, sensitivity_s, groups, per_group_ms, total_s."""
    if sensitivity not in (None, "output", "propagated"):
        raise ValueError(f"unknown sensitivity {sensitivity!r}")
    clock = {"capture_s": 0.0, "layer_errors_s": 0.0, "sensitivity_s": 0.0}
    start = time.perf_counter()
    modules = dict(model.named_modules())
    results: dict[str, dict] = {}
    with upcast(model, fp32):
        if batches:
            t = time.perf_counter()
            with capture_inputs(model, names, batches, max_rows=max_rows, seed=seed) as cap:
                clock["capture_s"] = time.perf_counter() - t
                t = time.perf_counter()
                for name, prec in names.items():
                    results[name] = _errors(modules[name].weight, prec, double_quant, cap.inputs(name))
                    cap.rows.pop(name, None)   # free as we go
                clock["layer_errors_s"] = time.perf_counter() - t
        else:
            t = time.perf_counter()
            for name, prec in names.items():
                results[name] = _errors(modules[name].weight, prec, double_quant, None)
            clock["layer_errors_s"] = time.perf_counter() - t
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(group_key(name), []).append(name)
            results[name]["group"] = group_key(name)
            results[name]["output_kl"] = None
            results[name]["block_error"] = None
        measured = 0
        if sensitivity and batches:
            t = time.perf_counter()
            tied = _tied_to_embeddings(model)
            wanted = {g: {m: names[m] for m in ms if m not in tied} for g, ms in groups.items()}
            measured = sum(1 for ps in wanted.values() if ps)
            if sensitivity == "output":
                scores = output_sensitivity(model, wanted, batches, double_quant=double_quant, mode=mode)
                field = "output_kl"
            else:
                scores = propagated_sensitivity(model, wanted, batches, double_quant=double_quant,
                                                extend=extend)
                field = "block_error"
            for g, members in groups.items():
                for m in members:
                    if m not in tied:
                        results[m][field] = scores[g]
            clock["sensitivity_s"] = time.perf_counter() - t
    if timing is not None:
        timing.update({k: round(v, 3) for k, v in clock.items()})
        timing.update({"sensitivity": sensitivity if batches else None, "groups": measured,
                       "per_group_ms": round(1e3 * clock["sensitivity_s"] / measured, 2) if measured
                       else None, "calibration_batches": len(batches or []),
                       "total_s": round(time.perf_counter() - start, 3)})
    return results


def timing_line(timing: dict) -> str:
    """One line for the log: where the analysis spent its time."""
    parts = [f"capture {timing['capture_s']:.1f} s", f"layer errors {timing['layer_errors_s']:.1f} s"]
    if timing.get("sensitivity"):
        parts.append(f"{timing['sensitivity']} sensitivity {timing['sensitivity_s']:.1f} s = "
                     f"{timing['groups']} groups × {timing['per_group_ms']:.0f} ms")
    return (f"analysis {timing['total_s']:.1f} s ({', '.join(parts)}; "
            f"{timing['calibration_batches']} calibration batches)")


def _tied_to_embeddings(model: nn.Module) -> set[str]:
    try:
        emb = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return set()
    return {n for n, m in model.named_modules() if getattr(m, "weight", None) is emb
            and isinstance(m, nn.Linear)}


def _errors(weight: torch.Tensor, precision: str, double_quant: bool, x: torch.Tensor | None) -> dict:
    with torch.no_grad():
        w = weight.detach().float()
        deq = dequantized(w, precision, double_quant)
        out = {"precision": precision, "weight_error": weight_error(w, deq),
               "activation_error": None, "rows": 0}
        if x is not None:
            out["activation_error"] = activation_error(x.float(), w, deq)
            out["rows"] = int(x.shape[0])
    return out


def _log_probs(model: nn.Module, batch: dict) -> torch.Tensor:
    """float32 log-softmax of the logits at the non-padding positions: (positions, vocab)."""
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    mb = move_batch(batch, device, dtype)
    logits = model(**mb).logits.float()
    mask = mb.get("attention_mask")
    keep = mask.bool() if mask is not None else torch.ones(logits.shape[:2], dtype=torch.bool,
                                                           device=logits.device)
    return F.log_softmax(logits[keep], -1)


def output_sensitivity(model: nn.Module, groups: dict[str, dict[str, str]], batches: list[dict], *,
                       double_quant: bool = True, mode: str = "isolated") -> dict[str, float]:
    """{group: KL score} (see the module docstring).

    ``isolated``: KL(p₁₆ ‖ q) with only the group quantized.
    ``leave_one_out``: KL(p₁₆ ‖ q_all) − KL(p₁₆ ‖ q_all¬g), every candidate quantized but the
    group: what protecting g gains where everything else is NF4 (clamped at 0). Holds a
    dequantized copy of every candidate weight (2× the candidates' fp32 bytes)."""
    out: dict[str, float] = {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        ref = [_log_probs(model, b) for b in batches]
        n = sum(r.shape[0] for r in ref)

        def kl_now() -> float:
            total = 0.0
            for b, lp in zip(batches, ref):
                lq = _log_probs(model, b)
                total += float((lp.exp() * (lp - lq)).sum(dtype=torch.float64))
            return max(0.0, total / max(n, 1))   # KL ≥ 0; a layer with no effect rounds to ±1e-9

        if mode == "isolated":
            for g, precisions in groups.items():
                if not precisions:
                    out[g] = None
                    continue
                with simulated(model, precisions, double_quant):
                    out[g] = kl_now()
            return out
        if mode != "leave_one_out":
            raise ValueError(f"unknown sensitivity mode {mode!r}")
        every = {m: p for ps in groups.values() for m, p in ps.items()}
        with simulated(model, every, double_quant):
            deq = {m: modules[m].weight.data for m in every}
        originals = {m: modules[m].weight.data for m in every}
        try:
            for m in every:
                modules[m].weight.data = deq[m]
            kl_all = kl_now()
            for g, precisions in groups.items():
                if not precisions:
                    out[g] = None
                    continue
                for m in precisions:
                    modules[m].weight.data = originals[m]
                out[g] = max(0.0, kl_all - kl_now())
                for m in precisions:
                    modules[m].weight.data = deq[m]
        finally:
            for m, w in originals.items():
                modules[m].weight.data = w
    return out


# the per-layer field each group metric fills (vlm.quant.sensitivity.measure)
GROUP_FIELDS = {"output": "output_kl", "propagated": "block_error"}


def ranking_error(stats: dict, metric: str) -> float:
    """One layer's error for ``metric`` (group measurement → activation error → weight error)."""
    field = GROUP_FIELDS.get(metric)
    if field and stats.get(field) is not None:
        return float(stats[field])
    if (field or metric == "activation") and stats.get("activation_error") is not None:
        return float(stats["activation_error"])
    return float(stats["weight_error"])


def group_score(members: list[str], errors: dict[str, dict], metric: str) -> float:
    """s_g: the group's KL or propagated error (measured for the group as a whole) or the sum of
    member errors."""
    field = GROUP_FIELDS.get(metric)
    if field and all(errors[m].get(field) is not None for m in members):
        return float(errors[members[0]][field])
    fallback = "activation" if field else metric
    return sum(ranking_error(errors[m], fallback) for m in members)


def candidate_groups(plan: QuantPlan) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The layers a policy may protect (quantized because of their component, not pinned by a
    rule) and their sensitivity groups: ({layer: LayerPlan}, {group: [layer, ...]})."""
    cands = {n: lp for n, lp in plan.layers.items()
             if lp.precision in QUANTIZED and lp.reason == "component"}
    groups: dict[str, list[str]] = {}
    for n, lp in cands.items():
        groups.setdefault(lp.group, []).append(n)
    return cands, groups


def nf4_multiple_limit(plan: QuantPlan, budget: NF4Multiple) -> dict[str, Any]:
    """The extra bytes an ``NF4Multiple`` budget r leaves the protection of ``plan`` (the plan
    before protection): B = r · bytes_nf4 − bytes_floor, clamped at 0 (see NF4Multiple), with the
    figures for the analysis record."""
    nf4, floor = plan.nf4_preset_bytes(), plan.total_bytes()
    cap = int(budget.ratio * nf4)
    return {"limit": float(max(cap - floor, 0)), "nf4_bytes": nf4, "floor_bytes": floor, "cap_bytes": cap,
            "floor_over_cap_bytes": max(floor - cap, 0)}


def budget_limit(plan: QuantPlan, budget: float | int | NF4Multiple, fraction_of: float
                 ) -> tuple[float, dict[str, Any]]:
    """(extra bytes or parameters the protection may spend, the ``NF4Multiple`` record or {}): an
    ``NF4Multiple`` through ``nf4_multiple_limit``, a fraction f as f × ``fraction_of`` (each planner
    says of what), a byte count as itself."""
    if isinstance(budget, NF4Multiple):
        cap = nf4_multiple_limit(plan, budget)
        return cap["limit"], cap
    return (budget * fraction_of if isinstance(budget, float) else float(budget)), {}


def choose_protected(plan: QuantPlan, errors: dict[str, dict], *, budget: float | int | NF4Multiple,
                     metric: str = "propagated", outliers_first: bool = True
                     ) -> tuple[set[str], dict[str, Any]]:
    """Protection under ``budget`` (see the module docstring); returns (names, analysis record).

    ``outliers_first=False`` with ``metric="activation"`` is the earlier heuristic (greedy by
    activation error per byte saved), kept for comparisons (benchmarks/quant_policies.py)."""
    dq = plan.policy.double_quant
    cands, groups = candidate_groups(plan)
    cand_params = sum(lp.params for lp in cands.values())
    limit, cap = budget_limit(plan, budget, cand_params)
    unit = "params" if isinstance(budget, float) else "bytes"
    scored = []
    for key, members in groups.items():
        score = group_score(members, errors, metric)
        saved = sum(cands[m].nbytes("bf16", dq) - cands[m].nbytes(cands[m].precision, dq)
                    for m in members)
        params = sum(cands[m].params for m in members)
        scored.append({"group": key, "layers": sorted(members), "error": score,
                       "bytes_saved_if_quantized": saved, "params": params,
                       "error_per_MB": score / max(saved, 1) * 1e6})
    local_metric = "weight" if metric == "weight" else "activation"
    local = {n: ranking_error(errors[n], local_metric) for n in cands}
    local_median = statistics.median(local.values()) if local else 0.0
    median = statistics.median(s["error"] for s in scored) if scored else 0.0
    for s in scored:
        s["layer_error"] = max(local[m] for m in s["layers"])
    by_score = lambda s: (-s["error"], s["group"])  # noqa: E731
    local_out = sorted((s for s in scored if outliers_first and s["layer_error"] > 0
                        and s["layer_error"] >= LOCAL_OUTLIER_FACTOR * local_median),
                       key=lambda s: (-s["layer_error"], s["group"]))
    output_out = sorted((s for s in scored if outliers_first and s not in local_out
                         and s["error"] > 0 and s["error"] >= OUTLIER_FACTOR * median), key=by_score)
    outliers = local_out + output_out
    rest = [s for s in scored if s not in outliers]
    order = outliers + sorted(rest, key=lambda s: (-s["error_per_MB"], s["group"]))
    spent, extra_bytes, protected, chosen, left_out = 0.0, 0, set(), [], []
    for rank, s in enumerate(order):
        cost = s["params"] if unit == "params" else s["bytes_saved_if_quantized"]
        is_outlier = s in outliers
        if spent + cost <= limit:
            spent += cost
            extra_bytes += s["bytes_saved_if_quantized"]
            protected.update(s["layers"])
            why = ("local outlier" if s in local_out else "output outlier" if is_outlier
                   else "per byte")
            chosen.append(dict(s, rank=rank, why=why))
        elif is_outlier:
            left_out.append({"group": s["group"], "error": s["error"], "cost": cost,
                             "budget_left": limit - spent})
    analysis = {"metric": metric, "budget": _budget_record(budget), "budget_unit": unit, "budget_limit": limit,
                **({"budget_nf4": cap} if cap else {}),
                "budget_spent": spent, "extra_bytes": extra_bytes, "candidate_params": cand_params,
                "median_error": median, "median_layer_error": local_median,
                "outlier_factors": ({"output": OUTLIER_FACTOR, "local": LOCAL_OUTLIER_FACTOR}
                                    if outliers_first else None),
                "outliers": [s["group"] for s in outliers],
                "outliers_over_budget": left_out,
                "protected_groups": chosen,
                "errors": {n: errors[n] for n in sorted(errors)}}
    return protected, analysis


def _budget_record(budget) -> float | int | str:
    return str(budget) if isinstance(budget, NF4Multiple) else budget


def choose_tiers(plan: QuantPlan, errors: dict[str, dict], tier_errors: dict[str, dict[str, dict]], *,
                 budget: float | int | NF4Multiple, metric: str = "propagated", tiers: tuple[str, ...] = ("int8w", "bf16")
                 ) -> tuple[dict[str, str], dict[str, Any]]:
    """Per group, a storage tier among nf4 (the plan's), ``tiers`` (int8w, bf16) under ``budget``.

    ``errors``: ``measure`` with the candidates in their quantized type (score s_g^q); ``tier_errors``:
    {tier: ``measure`` of the same layers stored in that tier} (s_g^t; 16-bit scores 0). Cost of
    tier t: C_g^t = Σ (bytes_t − bytes_q) of the members (int8w: out·in + 4·out, about a third of
    16-bit's extra bytes). A fraction budget f means f × Σ (bytes₁₆ − bytes_q) over the candidates:
    the bytes that protecting f of them in 16-bit costs, so both rankings spend the same bytes; an
    ``NF4Multiple`` r: the whole model within r × its nf4-preset bytes (``nf4_multiple_limit``).

    1. Outliers (the rules of ``choose_protected``: local and score outliers) take the cheapest
       tier that ends them (its group score < OUTLIER_FACTOR × median score and every member's own
       error < LOCAL_OUTLIER_FACTOR × median layer error), else the most precise tier, when the
       budget holds it; largest group score s_g^q first (not own error), so a budget too small
       for every outlier keeps those whose quantization hurts the model most.
    2. Then greedy upgrades: among every (group, tier above its current one) that fits the budget,
       the one with the largest error removed per extra byte, (s_g^cur − s_g^t) / (C_g^t − C_g^cur),
       until none fits or none removes error.

    Returns ({layer: tier} for the layers leaving nf4, analysis record)."""
    dq = plan.policy.double_quant
    cands, groups = candidate_groups(plan)
    full_cost = sum(lp.nbytes("bf16", dq) - lp.nbytes(lp.precision, dq) for lp in cands.values())
    limit, cap = budget_limit(plan, budget, full_cost)
    unit = (f"bytes (whole model ≤ {budget.ratio:g} × nf4 bytes)" if cap else
            "× the candidates' 16-bit extra bytes" if isinstance(budget, float) else "bytes")
    score = {"nf4": {g: group_score(ms, errors, metric) for g, ms in groups.items()}}
    cost = {"nf4": dict.fromkeys(groups, 0)}
    own = {"nf4": {n: ranking_error(errors[n], "weight" if metric == "weight" else "activation")
                   for n in cands}}
    for t in tiers:
        cost[t] = {g: sum(cands[m].nbytes(t, dq) - cands[m].nbytes(cands[m].precision, dq) for m in ms)
                   for g, ms in groups.items()}
        if t in ("bf16", "fp16"):
            score[t] = dict.fromkeys(groups, 0.0)
            own[t] = dict.fromkeys(cands, 0.0)
        else:
            score[t] = {g: group_score(ms, tier_errors[t], metric) for g, ms in groups.items()}
            own[t] = {n: ranking_error(tier_errors[t][n], "weight" if metric == "weight" else "activation")
                      for n in cands}
    median = statistics.median(score["nf4"].values()) if groups else 0.0
    local_median = statistics.median(own["nf4"].values()) if cands else 0.0
    worst = {g: max(own["nf4"][m] for m in ms) for g, ms in groups.items()}
    local_out = sorted((g for g in groups if worst[g] > 0 and worst[g] >= LOCAL_OUTLIER_FACTOR * local_median),
                       key=lambda g: (-worst[g], g))
    score_out = sorted((g for g in groups if g not in local_out and score["nf4"][g] > 0
                        and score["nf4"][g] >= OUTLIER_FACTOR * median), key=lambda g: (-score["nf4"][g], g))
    state = dict.fromkeys(groups, "nf4")
    spent, chosen, left_out = 0.0, [], []
    ending = {}
    for g in local_out + score_out:
        ends = [t for t in tiers if score[t][g] < OUTLIER_FACTOR * median
                and all(own[t][m] < LOCAL_OUTLIER_FACTOR * local_median for m in groups[g])]
        ending[g] = ends[0] if ends else tiers[-1]
    # among outliers, the largest group score first (what quantizing the group does to the model),
    # not the largest own error: when the budget cannot hold them all it keeps those that matter
    # most (demo base at 1.08x: layer 0's down_proj, score 10x layer 1's at the same own error, had
    # been left for layers 1-3's). Not per byte: a planted layer that only 16-bit ends must not
    # wait behind cheap int8w outliers (planted MLP, scenes calibration, at 1.08x)
    for g in sorted(ending, key=lambda g: (-score["nf4"][g], g)):
        t = ending[g]
        if spent + cost[t][g] <= limit:
            spent += cost[t][g]
            state[g] = t
            chosen.append({"group": g, "tier": t, "why": "local outlier" if g in local_out else "output outlier",
                           "error": score["nf4"][g], "error_in_tier": score[t][g], "extra_bytes": cost[t][g],
                           "error_per_MB": (score["nf4"][g] - score[t][g]) / max(cost[t][g], 1) * 1e6})
        else:
            left_out.append({"group": g, "error": score["nf4"][g], "tier": t, "cost": cost[t][g],
                             "budget_left": limit - spent})
    ladder = ("nf4",) + tiers
    while True:
        best = None
        for g, cur in state.items():
            for t in ladder[ladder.index(cur) + 1:]:
                extra = cost[t][g] - cost[cur][g]
                gain = score[cur][g] - score[t][g]
                if extra <= 0 or gain <= 0 or spent + extra > limit:
                    continue
                key = (gain / extra, g, t)
                if best is None or key[0] > best[0] or (key[0] == best[0] and (g, t) < best[1:]):
                    best = key
        if best is None:
            break
        _, g, t = best
        spent += cost[t][g] - cost[state[g]][g]
        state[g] = t
        chosen.append({"group": g, "tier": t, "why": "per byte", "error": score["nf4"][g],
                       "error_in_tier": score[t][g], "extra_bytes": cost[t][g], "error_per_MB": best[0] * 1e6})
    out = {m: t for g, t in state.items() if t != "nf4" for m in groups[g]}
    analysis = {"metric": metric, "budget": _budget_record(budget), "budget_unit": unit, "budget_limit": limit,
                **({"budget_nf4": cap} if cap else {}),
                "budget_spent": spent, "extra_bytes": int(spent), "tiers": list(tiers),
                "candidate_params": sum(lp.params for lp in cands.values()),
                "median_error": median, "median_layer_error": local_median,
                "outlier_factors": {"output": OUTLIER_FACTOR, "local": LOCAL_OUTLIER_FACTOR},
                "outliers": local_out + score_out, "outliers_over_budget": left_out,
                # one entry per group, its final tier (a group upgraded nf4 → int8w → bf16 is
                # listed once, where it was first chosen)
                "protected_groups": [dict(c, rank=i, layers=sorted(groups[c["group"]]))
                                     for i, c in enumerate({c["group"]: c for c in chosen}.values())],
                "tier_counts": {t: sum(1 for s in state.values() if s == t) for t in ladder},
                "errors": {n: errors[n] for n in sorted(errors)},
                "tier_errors": {t: {n: e for n, e in sorted(es.items())} for t, es in tier_errors.items()}}
    return out, analysis
