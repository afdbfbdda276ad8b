"""GGUF export agreement table: each zoo family llama.cpp runs × f16 / q8_0 / q4_k_m.

    OMP_NUM_THREADS=1 python benchmarks/gguf_agreement.py --out gguf_agreement.json

Per row: file sizes (language model, projector), whether llama.cpp's prompt layout and greedy
tokens equal transformers' (fp32), max |Δ logit|, top-1 agreement and mean KL along transformers'
greedy tokens (8 steps, one image prompt). Needs `make gguf-deps`. The models are the zoo's, with a
3-block vision tower (tests/vlm/export/gguf_zoo.py says why).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vlm" / "export"))


def main() -> None:
    from gguf_zoo import build_gguf_zoo

    from vlm.export.gguf import QUANTS, export_gguf, model_file
    from vlm.export.gguf_verify import compare_with_transformers
    from vlm.families.registry import all_families

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gguf_agreement.json")
    ap.add_argument("--variants", default=None, help="comma-separated zoo variants (default: all with GGUF support)")
    args = ap.parse_args()
    variants = args.variants.split(",") if args.variants else [
        v for f in all_families().values() if f.gguf for v in f.zoo_variants]
    rows = []
    print("| model | quant | model file | mmproj | prompt = | tokens = | max abs dlogit | top-1 | KL |")
    print("|---|---|---:|---:|:-:|:-:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            src = build_gguf_zoo(v, Path(tmp) / v)
            for q in QUANTS:
                out = export_gguf(src, Path(tmp) / f"{v}-{q}", quant=q, log=lambda m: None)
                r = compare_with_transformers(out, src, n_tokens=8)
                r.update(variant=v, quant=q, model_bytes=(out / model_file(q)).stat().st_size,
                         mmproj_bytes=(out / "mmproj-f16.gguf").stat().st_size)
                rows.append(r)
                print(f"| {v} | {q} | {r['model_bytes'] / 1024:.0f} KiB | {r['mmproj_bytes'] / 1024:.0f} KiB | "
                      f"{'yes' if r['prompt_tokens_equal'] else 'NO'} | {'yes' if r['tokens_equal'] else 'no'} | "
                      f"{r['max_abs_logit_diff']:.2e} | {r['top1_agreement']:.2f} | {r['kl_mean']:.1e} |", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
