"""Outputs of an evaluation run, each written atomically (temp file in the same folder, then rename):

- ``results.json``: config, notices and, per variant, memory, speed, metrics, CLIPScore, agreement.
- ``results.md``: one table row per variant: variant | example caption | memory | metrics | agreement.
- ``chart.png``: bars of the text metrics and agreement per variant, and model memory per variant.
- ``captions.jsonl``: every caption of every variant (variant, item id, caption, tokens, references).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FILES = ("results.json", "results.md", "chart.png", "captions.jsonl")
TABLE_METRICS = ("BLEU-4", "ROUGE-L", "CIDEr", "METEOR", "SPICE", "CLIPScore")


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    from vlm.atomic import write_bytes

    return write_bytes(path, data.encode() if isinstance(data, str) else data)


def _clean(x: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(results: dict) -> str:
    n_videos = results.get("num_videos", 0)
    counted = f"{results['num_items'] - n_videos} images, {n_videos} videos" if n_videos else f"{results['num_items']} images"
    lines = [f"# Caption evaluation ({counted})", ""]
    lines += ["| variant | example caption | memory | metrics | agreement |", "|---|---|---|---|---|"]
    for v in results["variants"]:
        mem = v["memory"]
        speed = v["speed"]
        memory = (f"model {fmt_bytes(mem['model_bytes'])}; peak {fmt_bytes(mem['peak_bytes'])}"
                  f" ({mem['peak_kind']}); {_num(speed['tokens_per_s'], 1)} tok/s")
        scores = dict(v["metrics"])
        if v.get("clipscore") is not None:
            scores["CLIPScore"] = v["clipscore"]
        metrics = ", ".join(f"{k} {_num(scores[k])}" for k in TABLE_METRICS if k in scores)
        if v.get("attributes"):
            metrics += f", all-attributes {_num(v['attributes']['all_attributes'])}"
        a = v.get("agreement") or {}
        if v["name"] == results.get("baseline"):
            agreement = "baseline"
        elif "exact_match" in a:
            parts = [f"exact {_num(a['exact_match'])}"]
            if "kl_mean" in a:
                parts += [f"KL {_num(a['kl_mean'], 4)}", f"top-1 {_num(a['top1_agreement'])}"]
            agreement = ", ".join(parts)
        else:
            agreement = "n/a"
        example = f"“{v['example_caption']}”" if v.get("example_caption") is not None else ""
        lines.append(f"| {_cell(v['name'])} | {_cell(example)} | {memory} | {metrics} | {_cell(agreement)} |")
    if results.get("notices"):
        lines += ["", "Notes:"] + [f"- {n}" for n in results["notices"]]
    lines += ["", "KL = mean KL(baseline ‖ variant) in nats over reference-caption tokens (teacher-forced); "
              "top-1 = agreement of the two models' argmax next token there; exact = identical greedy captions."]
    return "\n".join(lines) + "\n"


def chart_png(results: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    names = [v["name"] for v in variants]
    series: dict[str, list[float]] = {}
    keys = [k for k in ("BLEU-4", "ROUGE-L", "METEOR", "CIDEr") if any(k in v["metrics"] for v in variants)]
    for k in keys:   # CIDEr is on a 0-10 scale: shown /10 to share the axis with the [0, 1] metrics
        scale = 10.0 if k == "CIDEr" else 1.0
        series["CIDEr / 10" if k == "CIDEr" else k] = [v["metrics"].get(k, math.nan) / scale for v in variants]
    if any(v.get("clipscore") is not None for v in variants):
        series["CLIPScore"] = [v.get("clipscore") if v.get("clipscore") is not None else math.nan for v in variants]
    for k, label in (("exact_match", "exact match"), ("top1_agreement", "top-1 agreement")):
        if any(k in (v.get("agreement") or {}) for v in variants):
            series[label] = [(v.get("agreement") or {}).get(k, math.nan) for v in variants]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(series))
    for j, (label, vals) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax1.bar(xs, [0 if not math.isfinite(x) else x for x in vals], width, label=label)
    ax1.set_xticks(range(len(names)), names)
    ax1.set_title("caption metrics and agreement with the baseline")
    ax1.legend(fontsize=8, ncol=2)
    mem = [(v["memory"]["model_bytes"] or 0) / 2**20 for v in variants]
    ax2.bar(range(len(names)), mem, color="gray")
    ax2.set_xticks(range(len(names)), names)
    ax2.set_title("model memory (MiB)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def captions_jsonl(results: dict, items, captions: dict[str, Any]) -> str:
    """One line per (variant, image or video), variants in table order."""
    lines = []
    for v in results["variants"]:
        gen = captions[v["name"]]
        for it, cap, n in zip(items, gen.captions, gen.num_tokens):
            lines.append(json.dumps({"variant": v["name"], "item_id": it.item_id,
                                     "media": getattr(it, "media", "image"), "caption": cap,
                                     "num_tokens": n, "references": it.references}, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, results: dict, items, captions: dict[str, Any]) -> dict[str, Path]:
    """Write the four files under ``out_dir``; return their paths by name."""
    out = Path(out_dir)
    paths = {
        "captions.jsonl": atomic_write(out / "captions.jsonl", captions_jsonl(results, items, captions)),
        "results.md": atomic_write(out / "results.md", markdown_table(results)),
        "chart.png": atomic_write(out / "chart.png", chart_png(results)),
    }
    # results.json last: its presence means the run finished
    paths["results.json"] = atomic_write(out / "results.json",
                                         json.dumps(_clean(results), indent=2, ensure_ascii=False) + "\n")
    return paths
