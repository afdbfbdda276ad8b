"""The quantization report: per-layer errors and precisions, byte totals, agreement with 16-bit.

``build_report`` returns a JSON-ready dict:

    layers     [{name, component, shape, params, weight_error, activation_error, block_error,
                 output_kl, precision, bytes, reason}]   errors are those of the layer stored in
                the policy's quantized type (nf4 when it has none), whatever the policy chose for
                it; with only the layer's fused-sibling group quantized, block_error is the
                propagated error at its block's output (policy metric ``propagated``, the default)
                and output_kl the KL against 16-bit (``metric: output``; also for activation/weight)
    totals     {bf16_bytes, nf4_bytes, policy_bytes}   whole model (linears + everything else)
    agreement  {nf4: {kl, top1}, policy: {kl, top1}}    next-token agreement with the 16-bit model
    protected  groups the sensitivity analysis kept 16-bit: rank, why (local outlier / output
               outlier / per byte), score and score per MB saved
    budget     what the protection was allowed and what it spent (params or bytes, extra bytes)
    timing     where the analysis spent its time (capture, layer errors, sensitivity, per group)

``format_table`` prints it; ``plot`` draws error by layer index coloured by component.
"""

from __future__ import annotations

import os
from typing import Any

from vlm.quant.agreement import agreement, reference_logits
from vlm.quant.calibration import calibration_batches
from vlm.quant.loading import analyse
from vlm.quant.plan import QuantPlan, resolve_plan
from vlm.quant.policy import QuantPolicy

COMPONENT_COLOURS = {"vision": "tab:blue", "projector": "tab:purple", "language": "tab:green",
                     "lm_head": "tab:red", "embeddings": "tab:gray", "other": "tab:gray"}


def build_report(model, family, policy: QuantPolicy, batches: list[dict]) -> dict[str, Any]:
    """The report for a loaded 16-bit ``model`` under ``policy`` on calibration ``batches``."""
    plan = analyse(model, family, policy, batches, measure_all=True)
    nf4 = resolve_plan(QuantPolicy.preset("nf4"), model, family)
    errors = plan.analysis.get("errors", {})
    layers = []
    for name, lp in plan.layers.items():
        e = errors.get(name, {})
        layers.append({"name": name, "component": lp.component,
                       "shape": [lp.out_features, lp.in_features], "params": lp.params,
                       "weight_error": e.get("weight_error"),
                       "activation_error": e.get("activation_error"),
                       "block_error": e.get("block_error"), "output_kl": e.get("output_kl"),
                       "precision": lp.precision, "bytes": lp.nbytes(double_quant=policy.double_quant),
                       "reason": lp.reason, "index": lp.index})
    bf16 = resolve_plan(QuantPolicy.preset("bf16"), model, family)
    ref = reference_logits(model, batches)
    agree = {"nf4": agreement(model, _precisions(nf4), batches, double_quant=True, reference=ref),
             "policy": agreement(model, _precisions(plan), batches,
                                 double_quant=policy.double_quant, reference=ref)}
    protected = plan.analysis.get("protected_groups", [])
    return {"model": getattr(model.config, "_name_or_path", ""), "family": family.name,
            "policy": policy.to_dict(), "layers": layers,
            "totals": {"bf16_bytes": bf16.total_bytes(), "nf4_bytes": nf4.total_bytes(),
                       "policy_bytes": plan.total_bytes()},
            "agreement": agree,
            "protected": protected, "timing": plan.analysis.get("timing"),
            "budget": {k: plan.analysis.get(k) for k in ("metric", "budget", "budget_unit",
                                                         "budget_limit", "budget_spent",
                                                         "extra_bytes", "candidate_params",
                                                         "outliers", "outliers_over_budget")}}


def _precisions(plan: QuantPlan) -> dict[str, str]:
    return {n: lp.precision for n, lp in plan.layers.items()}


def _fmt(x: float | None) -> str:
    return "    -" if x is None else f"{x:.4f}"


def _fmt_kl(x: float | None) -> str:
    return "        -" if x is None else f"{x:.3e}"


def format_table(report: dict[str, Any]) -> str:
    rows = report["layers"]
    w = max([len(r["name"]) for r in rows] + [4])
    lines = [f"{'name':<{w}}  {'component':<10} {'shape':>12} {'params':>10}  {'w_err':>6}  "
             f"{'a_err':>6}  {'block_err':>9}  {'output_kl':>9}  {'prec':<5} {'bytes':>10}  reason"]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(f"{r['name']:<{w}}  {r['component']:<10} {shape:>12} {r['params']:>10}  "
                     f"{_fmt(r['weight_error'])}  {_fmt(r['activation_error'])}  "
                     f"{_fmt_kl(r.get('block_error'))}  {_fmt_kl(r.get('output_kl'))}  "
                     f"{r['precision']:<5} {r['bytes']:>10}  {r['reason']}")
    t = report["totals"]
    mib = 2**20
    lines += ["", f"totals: bf16 {t['bf16_bytes'] / mib:.2f} MiB | nf4 {t['nf4_bytes'] / mib:.2f} MiB"
                  f" | policy ({report['policy']['name']}) {t['policy_bytes'] / mib:.2f} MiB"]
    if report.get("timing"):
        from vlm.quant.sensitivity import timing_line

        lines.append(timing_line(report["timing"]))
    for k, a in report["agreement"].items():
        lines.append(f"agreement with 16-bit, {k}: mean KL {a['kl']:.5f}, top-1 {a['top1']:.3f}")
    if report["protected"]:
        b = report["budget"]
        kept = ("protected by the analysis (16-bit or int8w)" if any("tier" in g for g in report["protected"])
                else "kept 16-bit by the analysis")
        lines.append(f"{kept} (metric {b.get('metric')}; outliers first, then "
                     f"score per MB saved; budget {b['budget']} {b['budget_unit']}, spent "
                     f"{b['budget_spent']:.0f} of {b['budget_limit']:.0f}, "
                     f"+{(b.get('extra_bytes') or 0) / 2**20:.2f} MiB for the layers it keeps):")
        for g in report["protected"]:
            tier = f"  -> {g['tier']} (score there {g['error_in_tier']:.4g})" if "tier" in g else ""
            lines.append(f"  #{g['rank']:<3} {g['group']}  {g.get('why', '')}  score {g['error']:.4g}  "
                         f"{g['error_per_MB']:.4g}/MB{tier}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomic write (temp file in the same folder, then rename)."""
    from vlm.atomic import write_json as _write

    _write(path, report, indent=1)


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Error by layer index (activation error, weight error where none), coloured by component;
    layers the policy keeps 16-bit are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(report["layers"]) / 12), 3.5))
    for comp, colour in COMPONENT_COLOURS.items():
        rows = [r for r in report["layers"] if r["component"] == comp]
        if not rows:
            continue
        xs = [r["index"] for r in rows]
        ys = [r["activation_error"] if r["activation_error"] is not None else r["weight_error"]
              for r in rows]
        kept = [r["precision"] in ("bf16", "fp16") for r in rows]
        ax.scatter([x for x, k in zip(xs, kept) if not k], [y for y, k in zip(ys, kept) if not k],
                   s=14, color=colour, label=comp)
        ax.scatter([x for x, k in zip(xs, kept) if k], [y for y, k in zip(ys, kept) if k],
                   s=14, facecolors="none", edgecolors=colour,
                   label=f"{comp} (16-bit)" if any(kept) else None)
    ax.set_xlabel("layer index (module order)")
    ax.set_ylabel("relative error (activation; weight if unseen)")
    ax.set_title(f"quantization error per layer: {report['family']}, policy {report['policy']['name']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    from vlm.atomic import save_figure

    save_figure(fig, path, dpi=110)
    plt.close(fig)


def report_for_path(model_path: str, *, data: Any = None, policy: Any = "dynamic", budget: Any = None,
                    device: str = "cpu", dtype: Any = "bf16") -> dict[str, Any]:
    """Load ``model_path`` in 16-bit and build its report (what ``vlm quant-report`` runs)."""
    from vlm.load import load

    pol = QuantPolicy.parse(policy, budget=budget)
    model, processor = load(model_path, dtype=dtype, device=device)
    model.eval()
    batches = calibration_batches(data, processor, n=pol.calibration_samples, seed=pol.seed)
    rep = build_report(model, model.vlm_family, pol, batches)
    rep["model"] = str(model_path)
    return rep
