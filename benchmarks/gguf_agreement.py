"""GGUF export agreement table: each zoo family llama.cpp runs × f16 / q8_0 / q4_k_m.

    OMP_NUM_THREADS=1 python benchmarks/gguf_agreement.py --out gguf_agreement.json

Per row: file sizes (language model, projector), whether llama.cpp's prompt layout and greedy
tokens equal transformers' (fp32), max |Δ logit|, top-1 agreement and mean KL along transformers'
greedy tokens (8 steps, one image prompt). Needs `make gguf-deps`. The models are the zoo's, with a
3-block vision tower (tests/vlm/export/gguf_zoo.py says why).

A family with a named llama.cpp runtime defect (``GgufSupport.runtime_caveat``: LLaVA-1.5) gets one
more row per quant, ``image features: llama.cpp``, where transformers' language model is given
llama.cpp's image embeddings: it measures the rest of the export apart from that defect.
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
    print("| model | quant | image features | model file | mmproj | prompt = | tokens = | max abs dlogit (of max) "
          "| top-1 | KL |")
    print("|---|---|---|---:|---:|:-:|:-:|---:|---:|---:|")
    caveats = {v for f in all_families().values() if f.gguf and f.gguf.runtime_caveat for v in f.zoo_variants}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            src = build_gguf_zoo(v, Path(tmp) / v)
            for q in QUANTS:
                out = export_gguf(src, Path(tmp) / f"{v}-{q}", quant=q, log=lambda m: None)
                for features in ("transformers", "llama.cpp") if v in caveats else ("transformers",):
                    r = compare_with_transformers(out, src, n_tokens=8, image_features=features)
                    r.update(variant=v, quant=q, image_features=features,
                             model_bytes=(out / model_file(q)).stat().st_size,
                             mmproj_bytes=(out / "mmproj-f16.gguf").stat().st_size)
                    rows.append(r)
                    layout = "yes" if r["prompt_tokens_equal"] else " ".join(r["prompt_diff"]) + " extra"
                    print(f"| {v} | {q} | {features} | {r['model_bytes'] / 1024:.0f} KiB | "
                          f"{r['mmproj_bytes'] / 1024:.0f} KiB | {layout} | {'yes' if r['tokens_equal'] else 'no'} | "
                          f"{r['max_abs_logit_diff']:.1e} ({r['logit_scale']:.2f}) | {r['top1_agreement']:.2f} | "
                          f"{r['kl_mean']:.0e} |", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
