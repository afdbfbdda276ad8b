"""Which layers to keep 16-bit? Quantization policies compared at equal bytes, against bf16.

Rows (every linear of vision tower, projector and language model is a candidate; lm_head stays
16-bit as in transformers' standard 4-bit load; bytes are whole-model bytes from the plan):

    bf16          nothing quantized (the reference)
    nf4           every candidate in NF4 (double quant): the floor of the bytes
    skip-list     vision tower + projector 16-bit, language NF4 (what Unsloth and most users do)
    random        random fused-sibling groups protected, same byte budget (mean of --random-seeds)
    heuristic     the earlier dynamic ranking: activation error per byte saved, greedy
    policy (propagated)  this project's dynamic ranking (vlm.quant.sensitivity), outliers first,
                  with the default group measurement: the error propagated to the block's output
                  (vlm.quant.propagated; one block forward per group)
    policy (KL)   the same ranking on the output KL (``metric: output``; a whole-model forward
                  per group), and its leave-one-out variant
    random int8w  random groups stored int8w (vlm.quant.int8_linear) instead of 16-bit, same bytes
    policy (propagated, int8w+bf16)  ``tiers: [int8w, bf16]``: each group also measured stored
                  int8w, then per group nf4 / int8w / bf16 by error removed per extra byte
                  (vlm.quant.sensitivity.choose_tiers)
    dynamic (default preset)  what ``quant: dynamic`` plans for this model, through the product's
                  own ``vlm.quant.loading.analyse``: its 16-bit projector (not a candidate),
                  tiers [int8w, bf16], whole model ≤ its default budget (1.08x nf4 bytes)

random / heuristic / policy run at the byte budgets ``--ratio`` × the NF4 bytes (default 1.15 and
the default preset's 1.08; a comma list) and the skip list's bytes. Metrics against the bf16 model on held-out scenes (never the calibration
set): mean next-token KL(p_bf16 ‖ q) and top-1 agreement over the caption positions (teacher
forcing), exact-match caption accuracy of greedy captions against the references, and the share
of captions identical to bf16's. "gap closed" = 1 − KL / KL_nf4.

Every variant is simulated the same way (weights replaced by bitsandbytes' deq(q(W)), forward in
the model's load dtype, weights put back): the numbers compare policies, the arithmetic is equal.

    python benchmarks/quant_policies.py --out benchmarks/results/quant_policies_demo_base  # CPU
    python benchmarks/quant_policies.py --planted language_mlp --out ...                    # (c)
    python benchmarks/quant_policies.py --train-base /tmp/qbase --device cuda --out ...     # (b) GPU
    python benchmarks/quant_policies.py --tiny --device cpu --out DIR                       # smoke
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]     # vlm is imported as installed (pip install -e .)

# The larger base for the GPU (b): same family and data as the demo base, ~32 M parameters
# (text 8 × (3·512² + 3·512·1408) ≈ 23.6 M, vision 8 × (4·256² + 2·256·1024) ≈ 6.3 M, merger ≈ 1.6 M).
LARGE_TEXT = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1408)
LARGE_MROPE = [8, 12, 12]                       # sums to head_dim / 2 = 64 / 2
LARGE_VISION = dict(depth=8, embed_dim=256, num_heads=4, mlp_ratio=4)


def _variants(plan, errors, ratios: list[float], random_seeds: int, loo=None, propagated=None,
              propagated_int8w=None) -> list[dict]:
    """Rows: name, budget label, precisions per layer, and (for random) the seed."""
    from vlm.quant.policy import QUANTIZED
    from vlm.quant.sensitivity import choose_protected, choose_tiers

    dq = plan.policy.double_quant
    base = {n: lp.precision for n, lp in plan.layers.items()}
    nf4_bytes = plan.bytes_if(base, dq)
    skip = dict(base)
    for n, lp in plan.layers.items():
        if lp.component in ("vision", "projector") and lp.precision in QUANTIZED:
            skip[n] = "bf16"
    rows = [{"name": "bf16", "budget": "-", "prec": {n: "bf16" for n in base}},
            {"name": "nf4", "budget": "-", "prec": base},
            {"name": "skip-list", "budget": "-", "prec": skip}]
    budgets = {f"{ratio:.2f}x nf4": int((ratio - 1) * nf4_bytes) for ratio in ratios}
    budgets["= skip-list"] = plan.bytes_if(skip, dq) - nf4_bytes
    groups: dict[str, list[str]] = {}
    for n, lp in plan.layers.items():
        if lp.precision in QUANTIZED:
            groups.setdefault(lp.group, []).append(n)
    for label, extra in budgets.items():
        def protect(names):
            p = dict(base)
            p.update({n: "bf16" for n in names})
            return p

        for tier, row_name in (("bf16", "random"), ("int8w", "random int8w")):
            if tier == "int8w" and propagated_int8w is None:
                continue
            for seed in range(random_seeds):
                order = sorted(groups)
                random.Random(seed).shuffle(order)
                spent, keep = 0, []
                for g in order:
                    cost = sum(plan.layers[m].nbytes(tier, dq) - plan.layers[m].nbytes(None, dq)
                               for m in groups[g])
                    if spent + cost <= extra:
                        spent += cost
                        keep += groups[g]
                rows.append({"name": row_name, "budget": label, "seed": seed,
                             "prec": dict(base) | dict.fromkeys(keep, tier)})
        old, _ = choose_protected(plan, errors, budget=extra, metric="activation", outliers_first=False)
        rows.append({"name": "heuristic", "budget": label, "prec": protect(old)})
        if propagated is not None:
            new, analysis = choose_protected(plan, propagated, budget=extra, metric="propagated")
            rows.append({"name": "policy (propagated)", "budget": label, "prec": protect(new),
                         "outliers": analysis["outliers"]})
        if propagated_int8w is not None:
            tiers, analysis = choose_tiers(plan, propagated, {"int8w": propagated_int8w}, budget=extra,
                                           metric="propagated", tiers=("int8w", "bf16"))
            rows.append({"name": "policy (propagated, int8w+bf16)", "budget": label,
                         "prec": dict(base) | tiers, "outliers": analysis["outliers"]})
        new, analysis = choose_protected(plan, errors, budget=extra, metric="output")
        rows.append({"name": "policy (KL)", "budget": label, "prec": protect(new),
                     "outliers": analysis["outliers"]})
        if loo is not None:
            new, analysis = choose_protected(plan, loo, budget=extra, metric="output")
            rows.append({"name": "policy (KL, leave-one-out)", "budget": label, "prec": protect(new),
                         "outliers": analysis["outliers"]})
    return rows


def _eval_batches(processor, items):
    from vlm.quant.calibration import render

    return [render(processor, [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": it.reference}]}], [it.image])
        for it in items]


def _captions(model, processor, items, batch_size):
    from vlm.eval.generation import GenerationSettings, generate_captions

    return generate_captions(model, processor, items,
                             GenerationSettings(max_new_tokens=24, batch_size=batch_size)).captions


def run(args) -> dict:
    from vlm.data_formats.caption_attributes import caption_scores
    from vlm.data_formats.scene_vocab import DEFAULT_VOCAB
    from vlm.demo.accuracy import heldout_items
    from vlm.load import load
    from vlm.quant.agreement import agreement, reference_logits, simulated
    from vlm.quant.calibration import calibration_batches
    from vlm.quant.loading import analyse
    from vlm.quant.plan import resolve_plan
    from vlm.quant.plants import plant_outliers
    from vlm.quant.policy import QuantPolicy
    from vlm.quant.sensitivity import measure

    torch.manual_seed(0)
    model, processor = load(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    planted = None
    if args.planted:
        with torch.no_grad():
            planted = plant_outliers(model, args.planted)
    family = model.vlm_family
    policy = QuantPolicy.parse({"preset": "nf4", "dynamic": True})
    plan = resolve_plan(policy, model, family)
    cands = {n: lp.precision for n, lp in plan.layers.items() if lp.precision != "bf16"}
    t0 = time.perf_counter()
    image_size = model.config.vision_config.patch_size * 8
    if args.calibration == "scenes":      # the user's own kind of data (other scenes than the eval's)
        with tempfile.TemporaryDirectory() as tmp:
            calib = _eval_batches(processor, heldout_items(tmp, DEFAULT_VOCAB, n=args.calibration_samples,
                                                           seed=77, image_size=image_size))
    else:                                 # the product's default: synthetic shapes (vlm.quant.calibration)
        calib = calibration_batches(None, processor, n=args.calibration_samples, seed=policy.seed)
    timing = {"propagated": {}, "propagated_int8w": {}, "output": {}, "output_leave_one_out": {}}
    extend = policy.propagate_blocks if args.extend is None else args.extend
    prop = measure(model, cands, calib, double_quant=True, max_rows=policy.max_rows,
                   seed=policy.seed, sensitivity="propagated", extend=extend, timing=timing["propagated"])
    prop8 = measure(model, dict.fromkeys(cands, "int8w"), calib, double_quant=True, max_rows=policy.max_rows,
                    seed=policy.seed, sensitivity="propagated", extend=extend,
                    timing=timing["propagated_int8w"])
    errors = measure(model, cands, calib, double_quant=True, max_rows=policy.max_rows,
                     seed=policy.seed, sensitivity="output", mode="isolated", timing=timing["output"])
    loo = measure(model, cands, calib, double_quant=True, max_rows=policy.max_rows,
                  seed=policy.seed, sensitivity="output", mode="leave_one_out",
                  timing=timing["output_leave_one_out"])
    analysis_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        items = heldout_items(tmp, DEFAULT_VOCAB, n=args.eval_samples, seed=4242, image_size=image_size)
    batches = _eval_batches(processor, items)
    ref = reference_logits(model, batches)
    ref_captions = _captions(model, processor, items, args.batch_size)
    refs = [it.reference for it in items]
    rows = _variants(plan, errors, args.ratios, args.random_seeds, loo, prop, prop8)
    default = QuantPolicy.preset("dynamic")     # the product's default, as `vlm.load` plans it
    dplan = analyse(model, family, default, calib)   # the same calibration as the rows above
    rows.append({"name": "dynamic (default preset)", "budget": str(default.budget),
                 "prec": {n: lp.precision for n, lp in dplan.layers.items()},
                 "outliers": dplan.analysis["outliers"]})
    results = []
    for row in rows:
        a = agreement(model, row["prec"], batches, double_quant=True, reference=ref)
        with simulated(model, row["prec"], True):
            caps = _captions(model, processor, items, args.batch_size)
        results.append({k: v for k, v in row.items() if k != "prec"} | {
            "bytes": plan.bytes_if(row["prec"], True), "kl": a["kl"], "top1": a["top1"],
            "caption_exact": caption_scores(caps, refs, DEFAULT_VOCAB)["exact_match"],
            "same_caption_as_bf16": sum(c == r for c, r in zip(caps, ref_captions)) / len(items),
            "protected": sorted(n for n, p in row["prec"].items() if p == "bf16"
                                and plan.layers[n].precision != "bf16"),
            "int8w": sorted(n for n, p in row["prec"].items() if p == "int8w"),
            "planted_protected": None if planted is None else row["prec"][planted] in ("bf16", "int8w"),
            "planted_tier": None if planted is None else row["prec"][planted]})
    table = _aggregate(results)
    return {"model": str(args.model), "device": args.device, "dtype": args.dtype,
            "calibration": f"{args.calibration} × {args.calibration_samples}",
            "planted": planted, "analysis_seconds": round(analysis_s, 2), "analysis_timing": timing,
            "eval_samples": args.eval_samples, "ratios": args.ratios, "rows": table, "raw": results}


def _aggregate(results: list[dict]) -> list[dict]:
    """One row per (name, budget); random rows averaged over seeds."""
    out: dict[tuple, dict] = {}
    keys = ("bytes", "kl", "top1", "caption_exact", "same_caption_as_bf16")
    for r in results:
        k = (r["name"], r["budget"])
        if k not in out:
            out[k] = {"name": r["name"], "budget": r["budget"], "n": 0,
                      **{x: 0.0 for x in keys}, "planted_protected": r["planted_protected"],
                      "planted_tiers": []}
        o = out[k]
        o["n"] += 1
        for x in keys:
            o[x] += r[x]
        if r["planted_protected"] is not None:
            o["planted_protected"] = (o["planted_protected"] if o["n"] > 1 else True) and r["planted_protected"]
            if r["planted_tier"] not in o["planted_tiers"]:
                o["planted_tiers"].append(r["planted_tier"])
    rows = []
    nf4 = next(r for r in results if r["name"] == "nf4")
    for o in out.values():
        for x in keys:
            o[x] /= o["n"]
        o["bytes_vs_nf4"] = o["bytes"] / nf4["bytes"]
        o["kl_gap_closed"] = 1 - o["kl"] / nf4["kl"] if nf4["kl"] > 0 else None
        rows.append(o)
    return rows


def markdown(report: dict) -> str:
    lines = [f"model `{report['model']}`, {report['device']} {report['dtype']}, "
             f"{report['eval_samples']} held-out scenes, calibration {report['calibration']}"
             + (f", planted outliers in `{report['planted']}`" if report["planted"] else ""),
             "",
             "analysis (float32, same run): " + "; ".join(
                 f"{k.replace('_', ' ')} {t['total_s']:.2f} s (sensitivity {t['sensitivity_s']:.2f} s"
                 f" = {t['groups']} groups × {t['per_group_ms']:.1f} ms)"
                 for k, t in report.get("analysis_timing", {}).items()),
             "",
             "| variant | budget | MB | × nf4 | KL vs bf16 | gap closed | top-1 | caption exact "
             "| same caption as bf16 |" + (" planted protected |" if report["planted"] else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if report["planted"] else "")]
    for r in report["rows"]:
        gap = "-" if r["kl_gap_closed"] is None else f"{100 * r['kl_gap_closed']:.0f} %"
        name = r["name"] + (f" (mean of {r['n']})" if r["n"] > 1 else "")
        lines.append(f"| {name} | {r['budget']} | {r['bytes'] / 1e6:.3f} | {r['bytes_vs_nf4']:.3f} | "
                     f"{r['kl']:.5f} | {gap} | {r['top1']:.3f} | {r['caption_exact']:.3f} | "
                     f"{r['same_caption_as_bf16']:.3f} |"
                     + (f" {'yes' if r['planted_protected'] else 'no'} ({'/'.join(r['planted_tiers'])}) |"
                        if report["planted"] else ""))
    return "\n".join(lines)


def train_large_base(out: Path, device: str, steps: int, n_train: int) -> Path:
    """(b): the demo base's recipe at ~32 M parameters, trained on the project's synthetic scenes."""
    from vlm.zoo.demo_base import build_untrained, train_base

    if (out / "config.json").exists():
        return out
    build_untrained(out, seed=0, text=LARGE_TEXT, vision=LARGE_VISION, mrope_section=LARGE_MROPE)
    report = train_base(out, seed=0, steps=steps, n_train=n_train, lr=1e-3, device=device)
    (out / "train_report.json").write_text(json.dumps({k: v for k, v in report.items()}, indent=1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "vlm" / "zoo" / "assets" / "demo_base"))
    ap.add_argument("--out", required=True, help="folder for quant_policies.json and .md")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--ratio", default="1.15,1.08", help="byte budgets as multiples of the NF4 bytes "
                    "(comma list; 1.08: the dynamic preset's default)")
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--calibration", choices=("default", "scenes"), default="default",
                    help="default: the product's synthetic shapes; scenes: other scenes of the "
                         "eval's kind, as a user calibrating on their own data")
    ap.add_argument("--calibration-samples", type=int, default=4)
    ap.add_argument("--extend", type=int, default=None, help="propagated metric: blocks measured "
                    "past the group's own (default: the policy's `propagate`, 3; 0: its own block)")
    ap.add_argument("--planted", choices=("language_mlp", "language_attention", "vision_attention"))
    ap.add_argument("--train-base", metavar="DIR", help="train the ~32 M base into DIR (if absent) "
                    "and benchmark it (GPU: a few minutes)")
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--train-samples", type=int, default=8000)
    ap.add_argument("--tiny", action="store_true", help="smoke run: a tiny random zoo model, 8 scenes")
    args = ap.parse_args(argv)
    args.ratios = [float(r) for r in str(args.ratio).split(",")]
    torch.set_num_threads(1) if args.device == "cpu" else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from vlm.zoo import build_tiny

        args.model = str(build_tiny("qwen2_vl", out / "tiny_qwen2_vl"))
        args.eval_samples, args.random_seeds = 8, 2
    if args.train_base:
        args.model = str(train_large_base(Path(args.train_base), args.device, args.train_steps,
                                          args.train_samples))
    report = run(args)
    from vlm.atomic import write_json, write_text

    write_json(out / "quant_policies.json", report, indent=1)
    md = markdown(report)
    write_text(out / "quant_policies.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
