"""What the `dynamic` policy's analysis costs at load time, per sensitivity metric, same model, same run.

Loads a checkpoint once in 16-bit and runs the product's analysis (vlm.quant.loading.analyse, what
``vlm load``/``vlm train`` run on a plan-cache miss) once per metric on the product's default
calibration (4 synthetic samples, seed 0, float32; ``--data`` a training file instead, as ``vlm train``
calibrates): ``propagated`` (the default: 4 blocks per group, vlm.quant.propagated;
``propagated:end`` / ``propagated:0`` other depths) and ``output`` (the KL: one whole-model
forward per group); ``@model`` after a metric analyses in the load dtype (bf16) instead of float32,
and every metric after the first says whether its plan (the layers kept 16-bit) is the first's.
Prints and writes, per metric: where the time went (capture, per-layer errors, sensitivity, per
group) and the layers kept 16-bit; and how far the two plans agree.

    python benchmarks/quant_analysis_cost.py --size 7b --device cuda --out DIR   # GPU (random 7B)
    python benchmarks/quant_analysis_cost.py --model CHECKPOINT --device cuda --out DIR
    python benchmarks/quant_analysis_cost.py --tiny --device cpu --out DIR        # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(model_path: str, device: str, metrics: list[str], data: str | None = None) -> dict:
    from vlm.load import load
    from vlm.quant.calibration import calibration_batches
    from vlm.quant.loading import analyse
    from vlm.quant.policy import QuantPolicy

    t0 = time.perf_counter()
    model, processor = load(model_path, dtype="bf16", device=device)
    model.eval()
    load_s = time.perf_counter() - t0
    out = {"model": model_path, "device": device, "load_16bit_s": round(load_s, 2), "metrics": {}}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    kept = {}
    for metric in metrics:   # "propagated", "propagated:end", "propagated:0", "output"; "@model": load dtype
        metric_depth, _, dtype = metric.partition("@")
        name, _, propagate = metric_depth.partition(":")
        spec = {"preset": "dynamic", "metric": name, "analysis_dtype": dtype or "fp32"}
        if propagate:
            spec["propagate"] = propagate if propagate == "end" else int(propagate)
        policy = QuantPolicy.parse(spec)
        batches = calibration_batches(data, processor, n=policy.calibration_samples, seed=policy.seed)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        plan = analyse(model, model.vlm_family, policy, batches)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        kept[metric] = {n for n, lp in plan.layers.items() if lp.reason == "protected"}
        row = {"wall_s": round(wall, 2), "timing": plan.analysis["timing"],
               "calibration_tokens": sum(int(b["input_ids"].numel()) for b in batches),
               "protected_layers": len(kept[metric]),
               "protected_groups": [g["group"] for g in plan.analysis["protected_groups"]]}
        if device.startswith("cuda"):
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["metrics"][metric] = row
    if "propagated" in kept and "output" in kept:
        a, b = kept["propagated"], kept["output"]
        out["protected_overlap"] = {"both": len(a & b), "either": len(a | b)}
    first = metrics[0]
    for metric in metrics[1:]:   # the same plan as the first metric? (e.g. propagated@model vs propagated)
        a, b = kept[first], kept[metric]
        out["metrics"][metric]["vs_" + first] = {"same_plan": a == b, "only_here": sorted(b - a),
                                                 "only_there": sorted(a - b)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder")
    ap.add_argument("--size", choices=("2b", "7b"), help="a random Qwen2-VL checkpoint at these "
                    "shapes (benchmarks/random_qwen2_vl.py), built under --out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--metrics", default="propagated,output",
                    help="comma-separated: propagated (default propagate: 3), propagated:end, "
                         "propagated:0, output (the KL); a suffix @model analyses in the load dtype "
                         "(quant.analysis_dtype: model) instead of float32, e.g. propagated@model")
    ap.add_argument("--data", help="calibration records (JSON/JSONL/parquet) instead of the "
                    "synthetic set, e.g. the training file of a `vlm train` config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="smoke run on a tiny random zoo model")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.tiny:
        from vlm.zoo import build_tiny

        args.model = str(build_tiny("qwen2_vl", out / "tiny_qwen2_vl"))
    elif args.size:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from random_qwen2_vl import build

        args.model = str(build(out, args.size))
    if not args.model:
        ap.error("give --model, --size or --tiny")
    report = run(args.model, args.device, [m.strip() for m in args.metrics.split(",") if m.strip()],
                 args.data)
    from vlm.atomic import write_json

    write_json(out / "quant_analysis_cost.json", report, indent=1)
    for metric, row in report["metrics"].items():
        t = row["timing"]
        print(f"{metric:>10}: analysis {row['wall_s']:.1f} s (capture {t['capture_s']:.1f} s, layer "
              f"errors {t['layer_errors_s']:.1f} s, sensitivity {t['sensitivity_s']:.1f} s = "
              f"{t['groups']} groups × {t['per_group_ms']:.0f} ms); {row['protected_layers']} layers "
              f"kept 16-bit; {row['calibration_tokens']} calibration tokens"
              + (f"; peak {row['peak_gib']} GiB" if "peak_gib" in row else "")
              + "".join(f"; {'same plan as' if v['same_plan'] else 'NOT the plan of'} {k[3:]}"
                        + ("" if v["same_plan"] else f" ({len(v['only_here'])} layers only here, "
                                                     f"{len(v['only_there'])} only there)")
                        for k, v in row.items() if k.startswith("vs_")))
    if "protected_overlap" in report:
        o = report["protected_overlap"]
        print(f"kept 16-bit by both metrics: {o['both']} of {o['either']} layers")
    print(f"wrote {out / 'quant_analysis_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
