"""Sensitivity analysis: measure each quantizable layer's error, protect the worst per byte saved.

1. ``measure``: one forward pass over the calibration batches captures subsampled inputs X of every
   candidate layer (vlm.quant.capture); for each layer, with Ŵ = deq(q(W)) from bitsandbytes:
   e_w = ‖W − Ŵ‖/‖W‖ and e_a = ‖XWᵀ − XŴᵀ‖/‖XWᵀ‖ (vlm.quant.metrics). Layers that never ran on
   the calibration data have e_a = None and are ranked by e_w.
2. ``choose_protected``: layers are grouped by fused siblings (q/k/v, gate/up: vLLM serves them as
   one layer). A group g has error E_g = Σ e_i (e = e_a, or e_w when ``metric: weight`` or no
   activation was seen) and saves S_g = Σ (bytes16_i − bytesQ_i) when quantized. Groups are
   ranked by E_g / S_g (error per byte saved; ties by name) and protected greedily while they fit
   the budget: a fraction f protects at most f × (candidate parameters), a byte budget B at most B
   extra bytes. Deterministic given the errors; the errors are reproducible for a seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm.quant.capture import capture_inputs
from vlm.quant.metrics import activation_error, dequantized, weight_error
from vlm.quant.plan import QuantPlan
from vlm.quant.policy import QUANTIZED


def measure(model: nn.Module, names: dict[str, str], batches: list[dict] | None, *,
            double_quant: bool = True, max_rows: int = 256, seed: int = 0) -> dict[str, dict]:
    """Errors of each layer ``name`` quantized to ``names[name]`` → {name: {weight_error, ...}}."""
    modules = dict(model.named_modules())
    results: dict[str, dict] = {}
    if batches:
        with capture_inputs(model, names, batches, max_rows=max_rows, seed=seed) as cap:
            for name, prec in names.items():
                results[name] = _errors(modules[name].weight, prec, double_quant, cap.inputs(name))
                cap.rows.pop(name, None)   # free as we go
    else:
        for name, prec in names.items():
            results[name] = _errors(modules[name].weight, prec, double_quant, None)
    return results


def _errors(weight: torch.Tensor, precision: str, double_quant: bool, x: torch.Tensor | None) -> dict:
    with torch.no_grad():
        deq = dequantized(weight, precision, double_quant)
        out = {"precision": precision, "weight_error": weight_error(weight, deq),
               "activation_error": None, "rows": 0}
        if x is not None:
            out["activation_error"] = activation_error(x, weight, deq)
            out["rows"] = int(x.shape[0])
    return out


def ranking_error(stats: dict, metric: str) -> float:
    if metric == "activation" and stats.get("activation_error") is not None:
        return float(stats["activation_error"])
    return float(stats["weight_error"])


def choose_protected(plan: QuantPlan, errors: dict[str, dict], *, budget: float | int,
                     metric: str = "activation") -> tuple[set[str], dict[str, Any]]:
    """Greedy protection under ``budget``; returns (protected names, analysis record)."""
    dq = plan.policy.double_quant
    cands = {n: lp for n, lp in plan.layers.items()
             if lp.precision in QUANTIZED and lp.reason == "component"}
    groups: dict[str, list[str]] = {}
    for n, lp in cands.items():
        groups.setdefault(lp.group, []).append(n)
    cand_params = sum(lp.params for lp in cands.values())
    if isinstance(budget, float):
        limit, unit = budget * cand_params, "params"
    else:
        limit, unit = float(budget), "bytes"
    scored = []
    for key, members in groups.items():
        err = sum(ranking_error(errors[m], metric) for m in members)
        saved = sum(cands[m].nbytes("bf16", dq) - cands[m].nbytes(cands[m].precision, dq)
                    for m in members)
        params = sum(cands[m].params for m in members)
        scored.append((err / max(saved, 1), key, members, err, saved, params))
    scored.sort(key=lambda t: (-t[0], t[1]))
    spent, protected, chosen = 0.0, set(), []
    for rank, (score, key, members, err, saved, params) in enumerate(scored):
        cost = params if unit == "params" else saved
        if spent + cost <= limit:
            spent += cost
            protected.update(members)
            chosen.append({"group": key, "layers": sorted(members), "rank": rank,
                           "error": err, "bytes_saved_if_quantized": saved, "params": params,
                           "error_per_MB": score * 1e6})
    analysis = {"metric": metric, "budget": budget, "budget_unit": unit, "budget_limit": limit,
                "budget_spent": spent, "candidate_params": cand_params,
                "protected_groups": chosen,
                "errors": {n: errors[n] for n in sorted(errors)}}
    return protected, analysis
