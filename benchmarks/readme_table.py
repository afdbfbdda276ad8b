"""Print the README's performance tables from benchmarks/results/train_step*.json.

    python benchmarks/readme_table.py            # every table the README shows
    python benchmarks/readme_table.py FILE.json  # one results file

The README tables are this script's output, pasted; rerun it after a new train_step.py run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"a": "transformers + PEFT (grad. checkpointing)", "b": "+ bitsandbytes NF4",
          "c": "+ Liger-Kernel", "d": "**vlmtune LoRA (16-bit)**", "e": "**vlmtune QLoRA (dynamic policy)**",
          "d_ro": "vlmtune LoRA, `training.cuda_graphs: true`",
          "d_ro_mlp2": "**vlmtune LoRA, `cuda_graphs: true`, `mlp_chunks: 2`**",
          "e_ro": "vlmtune QLoRA, `training.cuda_graphs: true`",
          "e_ro_mlp2": "**vlmtune QLoRA, `cuda_graphs: true`, `mlp_chunks: 2`**",
          "d_mlp2": "vlmtune LoRA, `training.mlp_chunks: 2`",
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


RESULTS = Path(__file__).parent / "results"
# (heading, results file): the table of record first, then the other setups and W at 7B shapes
README_TABLES = (
    ("Qwen2-VL-2B shapes (table of record)", "train_step.json"),
    ("Qwen2-VL-2B shapes, other setups (another run)", "train_step_run14.json"),
    ("Qwen2-VL-7B shapes", "train_step_qwen2_vl_7b.json"),
    ("LLaVA-1.5-7B shapes (batch 8 × 832 tokens, 576 image tokens per 336² image)", "train_step_llava_1_5_7b.json"),
    ("Qwen3-VL-8B shapes (one 512² image = 256 tokens of 16-px patches; one H200)", "train_step_qwen3_vl_8b.json"),
)

if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(table(json.loads(Path(sys.argv[1]).read_text())))
    else:
        print("\n\n".join(f"**{head}** (`benchmarks/results/{name}`):\n\n{table(json.loads((RESULTS / name).read_text()))}"
                           for head, name in README_TABLES))
