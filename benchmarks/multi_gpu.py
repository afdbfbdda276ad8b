"""QLoRA on Qwen2-VL-7B shapes: 1 GPU vs 2 GPUs (FSDP2, and DDP for reference) — issue 10.

    source benchmarks/device_install.sh        # on the device (carry .whl/bitsandbytes-*.whl)
    python benchmarks/multi_gpu.py             # needs >= 2 GPUs for the 2-GPU rows
    python benchmarks/multi_gpu.py --steps 30 --runs 1gpu,fsdp2,ddp2

What runs: ``vlm train configs/qwen2_vl_7b_qlora.yaml`` unchanged except for the overrides below,
on a random-weight model with Qwen2-VL-7B's full shapes (text 3584 × 28 layers, vocab 152,064;
vision 32 blocks × 1280), built once on the GPU (seed 0, bf16). The processor is the zoo's tiny
Qwen2-VL one (offline, no hub): its special-token ids are written into the big config, so
tokens-per-sample differ from the real tokenizer's but every run here sees the same data.
Data: ``vlm.data_formats.synthetic`` scenes at 448 × 448 (the recipe's min_pixels lifts them to
≥ 256 image tokens). Overrides: model.path, data.train, output, training.max_steps,
training.save_steps (no checkpoint inside the timed run), logging off.

Rows (each a fresh ``vlm train`` process tree, so memory peaks never mix):
  1gpu        one process, plain QLoRA (bitsandbytes uint8 storage), compiled layers (the default)
  1gpu_eager  the same with ``training.compile=false``: FSDP's reference, since compile is off under
              FSDP (``training.compile: auto``)
  fsdp2       ``--nproc 2 distributed.strategy=fsdp``: FSDP2 full shard, 4-bit weights stored in bf16
              (``distributed.quant_storage: auto``) so FSDP can shard them; eager
  ddp2        ``--nproc 2 distributed.strategy=ddp``: a replica per GPU, compiled layers
"× 1 GPU" compares each row with the 1-GPU row of the same compile setting.
The per-device batch is the config's (2 × grad_accum 8), so the 2-GPU rows step over a global batch
twice as large: tokens/s is the throughput figure to compare, not steps/s.
Recorded per row (summary.json of the run): tokens/s over all processes (non-padding tokens / train
seconds, first step included), peak CUDA memory allocated per process, final loss, wall seconds.
Writes benchmarks/results/multi_gpu_<GPU>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
CONFIG = REPO / "configs" / "qwen2_vl_7b_qlora.yaml"
GiB = 2**30
RUNS = {"1gpu": (1, None), "1gpu_eager": (1, None), "fsdp2": (2, "fsdp"), "ddp2": (2, "ddp")}


def build_model(root: Path) -> Path:
    """Random bf16 weights at Qwen2-VL-7B's shapes + the tiny zoo processor; built once."""
    from random_qwen2_vl import build

    return build(root, "7b")


def run(name: str, model: Path, data: Path, root: Path, steps: int) -> dict:
    nproc, strategy = RUNS[name]
    out = root / f"run_{name}"
    cmd = [sys.executable, "-m", "vlm", "train", str(CONFIG), f"model.path={model}",
           f"data.train=[{data}]", f"output={out}", f"training.max_steps={steps}",
           f"training.save_steps={steps * 10}", "logging.tensorboard=false", "logging.progress=false",
           "training.logging_steps=5"]
    if strategy:
        cmd += [f"distributed.strategy={strategy}", "--nproc", str(nproc)]
    if name.endswith("_eager"):
        cmd += ["training.compile=false"]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"run": name, "gpus": nproc, "strategy": strategy or "single", "returncode": r.returncode,
           "wall_seconds": round(wall, 1), "command": " ".join(cmd[1:])}
    if r.returncode != 0:
        row["error_tail"] = (r.stdout[-1500:] + "\n" + r.stderr[-3000:]).strip()
        return row
    s = json.loads((out / "summary.json").read_text())
    per = s.get("peak_memory_bytes_per_process") or [s["peak_memory_bytes"]]
    row.update(steps=s["steps"], tokens=s["tokens"], train_seconds=s["train_seconds"],
               tokens_per_s=s["tokens_per_s"], peak_mem_gib_per_gpu=[round(b / GiB, 2) for b in per],
               final_loss=s["final_loss"], compiled=bool(s.get("compiled_layers")),
               global_batch=s["config"]["training"]["batch_size"]
               * s["config"]["training"]["grad_accum"] * nproc)
    return row


def write(rows: list[dict], env: dict) -> Path:
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = "multi_gpu_" + env["gpu"].replace(" ", "_")
    (out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    base = {r["compiled"]: r for r in rows if r["gpus"] == 1 and r.get("tokens_per_s")}
    lines = [f"# Multi-GPU QLoRA, Qwen2-VL-7B shapes (random weights) — {env['gpu']}", "",
             f"configs/qwen2_vl_7b_qlora.yaml, {env['steps']} steps per run; torch {env['torch']}, "
             f"transformers {env['transformers']}, accelerate {env['accelerate']}.", "",
             "| run | GPUs | compiled | tokens/s (all GPUs) | × 1 GPU | peak mem per GPU (GiB) | global batch "
             "| final loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['run']} | {r['gpus']} | | not run: {r['skipped']} | | | | |")
            continue
        if r["returncode"] != 0:
            lines.append(f"| {r['run']} | {r['gpus']} | | failed (rc {r['returncode']}) | | | | |")
            continue
        ref = base.get(r["compiled"])
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "n/a"
        lines.append(f"| {r['run']} | {r['gpus']} | {'yes' if r['compiled'] else 'no'} | {r['tokens_per_s']:.0f} | "
                     f"{speed} | "
                     f"{', '.join(map(str, r['peak_mem_gib_per_gpu']))} | {r['global_batch']} | "
                     f"{r['final_loss']:.4f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out / f"{stem}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--runs", default="1gpu,1gpu_eager,fsdp2,ddp2")
    ap.add_argument("--root", default="/tmp/vlm_multi_gpu")
    args = ap.parse_args(argv)

    import accelerate
    import torch
    import transformers

    from vlm.data_formats.synthetic import generate

    n_gpu = torch.cuda.device_count()
    if n_gpu < 1:
        print("multi_gpu.py needs CUDA GPUs")
        return 2
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    model = build_model(root)
    data_dir = root / "data"
    data = data_dir / "sharegpt.json"
    if not data.is_file():
        data = Path(generate(data_dir, n=args.samples, seed=0, image_size=448).sharegpt_json)
    env = {"gpu": torch.cuda.get_device_name(0), "gpus_visible": n_gpu, "torch": torch.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "python": platform.python_version(), "steps": args.steps}
    rows = []
    for name in args.runs.split(","):
        if RUNS[name][0] > n_gpu:
            rows.append({"run": name, "gpus": RUNS[name][0], "returncode": None,
                         "skipped": f"needs {RUNS[name][0]} GPUs, {n_gpu} visible"})
            print(f"{name}: skipped ({n_gpu} GPU)")
            continue
        print(f"{name}: running ...", flush=True)
        rows.append(run(name, model, data, root, args.steps))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "error_tail"}), flush=True)
        if rows[-1].get("error_tail"):
            print(rows[-1]["error_tail"])
    write(rows, env)
    return 0 if all(r.get("returncode") in (0, None) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
