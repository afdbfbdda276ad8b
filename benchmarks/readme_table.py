"""Print the README's performance table from benchmarks/results/train_step.json.

    python benchmarks/readme_table.py [results/train_step.json]

The README table is this script's output, pasted; rerun it after a new train_step.py run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"a": "transformers + PEFT (grad. checkpointing)", "b": "+ bitsandbytes NF4",
          "c": "+ Liger-Kernel", "d": "**vlmtune LoRA (16-bit)**", "e": "**vlmtune QLoRA (dynamic policy)**",
          "d_eager": "vlmtune LoRA, `training.compile: false`",
          "e_eager": "vlmtune QLoRA, `training.compile: false`",
          "d_novis": "vlmtune LoRA, HF's image-by-image vision attention"}


def table(results: dict) -> str:
    rows = {r["variant"]: r for r in results["rows"]}
    base = rows["a"]
    env = results["env"]
    lines = [f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}, liger-kernel {env['liger_kernel']}; ratios are against "
             "transformers + PEFT measured in the same run.", "",
             "| setup | tokens/s | vs HF+PEFT | peak GPU memory | vs HF+PEFT | MFU | first-step loss Δ |",
             "|---|---|---|---|---|---|---|"]
    fl, peak = results["flops"]["model_flops"], results["matmul_tflops"] * 1e12
    for key, label in LABELS.items():
        r = rows.get(key)
        if r is None:
            continue
        rel = abs(r["first_step_loss"] - base["first_step_loss"]) / abs(base["first_step_loss"])
        lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}× | "
                     f"{r['peak_alloc_gib']:.2f} GiB | {r['peak_alloc_gib'] / base['peak_alloc_gib']:.2f}× | "
                     f"{fl / r['step_s_median'] / peak:.1%} | {rel:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "train_step.json")
    print(table(json.loads(path.read_text())))
