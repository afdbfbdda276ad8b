"""Qwen2-VL-7B on 1 GPU vs 2 GPUs (FSDP2 and DDP) through `vlm train` — issue 19.

    source benchmarks/device_install.sh        # on the device (carry .whl/bitsandbytes-*.whl)
    python benchmarks/multi_gpu.py --runs 1gpu_eager,fsdp2,lora16_1gpu,lora16_fsdp2
    python benchmarks/multi_gpu.py --runs 1gpu,ddp2,resume_fsdp2_on_1gpu

What runs: ``vlm train configs/qwen2_vl_7b_qlora.yaml`` unchanged (dynamic 4-bit policy, adamw_8bit)
except for the overrides below, on a random-weight model with Qwen2-VL-7B's full shapes (text 3584 ×
28 layers, vocab 152,064; vision 32 blocks × 1280), built once on the GPU (seed 0, bf16). The
processor is the zoo's tiny Qwen2-VL one (offline, no hub). Data: ``vlm.data_formats.synthetic``
scenes at 448 × 448. Overrides: model.path, data.train, output, training.max_steps,
training.save_steps, logging.

Rows (each a fresh ``vlm train`` process tree, so memory peaks never mix):
  1gpu / 1gpu_eager     one process, compiled (the default) / ``training.compile=false``
  fsdp2                 ``--nproc 2 distributed.strategy=fsdp``: FSDP2 full shard, 4-bit weights
                        stored in bf16 so FSDP can shard them, adamw_8bit on the shards; eager
                        (compile is off under FSDP); checkpoint at the last step
  ddp2                  ``--nproc 2 distributed.strategy=ddp``: a replica per GPU, compiled
  lora16_1gpu / lora16_fsdp2   16-bit LoRA (``quant=bf16``), eager: FSDP's memory case
  resume_fsdp2_on_1gpu  resumes fsdp2's checkpoint in one process (2 → 1: grad_accum doubles to keep
                        the global batch) for ``--resume-steps`` more steps
Same per-GPU batch everywhere (the config's 2); the 2-GPU rows halve grad_accum (8 → 4), so every
row steps over the same global batch of 16 samples and the loss curves compare step for step.
"× 1 GPU" compares the steady-state tokens/s (optimizer steps 3.. of the run: compile and warm-up
excluded, summed over processes) with the 1-GPU row of the same compile setting and quantization.
Memory per GPU: the load peak (model load, data, setup: before the first step) and the training
peak (from the first step on), both CUDA max allocated.
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
EAGER = ["training.compile=false"]
LORA16 = ["quant=bf16", "training.compile=false"]
HALF_ACCUM = ["training.grad_accum=4"]
# the sample-count batch these rows were measured with (the shipped config now batches by tokens)
SAMPLE_BATCH = ["data.max_tokens_per_batch=null", "training.batch_size=2", "training.grad_accum=8"]
# name -> (processes, strategy, overrides)
RUNS = {
    "1gpu": (1, None, []),
    "1gpu_eager": (1, None, EAGER),
    "fsdp2": (2, "fsdp", HALF_ACCUM),
    "ddp2": (2, "ddp", HALF_ACCUM),
    "lora16_1gpu": (1, None, LORA16),
    "lora16_fsdp2": (2, "fsdp", LORA16 + HALF_ACCUM),
    "resume_fsdp2_on_1gpu": (1, None, EAGER),
}
# the same rows at a per-GPU batch of 8 (global 16): enough work per forward for the GPU to be busy
B8_ONE, B8_TWO = ["training.batch_size=8", "training.grad_accum=2"], ["training.batch_size=8", "training.grad_accum=1"]
RUNS.update({f"{k}_b8": (n, st, [o for o in ov if o not in HALF_ACCUM] + (B8_TWO if n == 2 else B8_ONE))
             for k, (n, st, ov) in list(RUNS.items()) if not k.startswith("resume_")})


def build_model(root: Path) -> Path:
    """Random bf16 weights at Qwen2-VL-7B's shapes + the tiny zoo processor; built once."""
    from random_qwen2_vl import build

    return build(root, "7b")


def run(name: str, model: Path, data: Path, root: Path, steps: int, resume_steps: int) -> dict:
    nproc, strategy, overrides = RUNS[name]
    resume = name.startswith("resume_")
    out = root / ("run_fsdp2" if resume else f"run_{name}")
    total = steps + resume_steps if resume else steps
    cmd = [sys.executable, "-m", "vlm", "train", str(CONFIG), f"model.path={model}",
           f"data.train=[{data}]", f"output={out}", f"training.max_steps={total}",
           f"training.save_steps={steps}", "logging.tensorboard=false", "logging.progress=false",
           "training.logging_steps=1", *SAMPLE_BATCH, *overrides]
    if strategy:
        cmd += [f"distributed.strategy={strategy}", "--nproc", str(nproc)]
    if resume:
        cmd += ["--resume"]
    elif out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"run": name, "gpus": nproc, "strategy": strategy or "single", "returncode": r.returncode,
           "wall_seconds": round(wall, 1), "command": " ".join(cmd[1:]),
           "quant": "bf16" if "quant=bf16" in overrides else "dynamic"}
    if r.returncode != 0:
        row["error_tail"] = (r.stdout[-1500:] + "\n" + r.stderr[-3000:]).strip()
        return row
    s = json.loads((out / "summary.json").read_text())
    per = s.get("peak_memory_bytes_per_process") or [s["peak_memory_bytes"]]
    load = s.get("load_peak_memory_bytes_per_process") or []
    row.update(steps=s["steps"], tokens=s["tokens"], train_seconds=s["train_seconds"],
               tokens_per_s=s["tokens_per_s"], tokens_per_s_steady=s.get("tokens_per_s_steady"),
               peak_mem_gib_per_gpu=[round(b / GiB, 2) for b in per],
               load_peak_mem_gib_per_gpu=[round(b / GiB, 2) for b in load],
               final_loss=s["final_loss"], loss_history=s.get("loss_history"),
               resumed_from=s.get("resumed_from"), compiled=bool(s.get("compiled_layers")),
               optimizer=s["config"]["training"]["optimizer"],
               global_batch=s["config"]["training"]["batch_size"]
               * s["config"]["training"]["grad_accum"] * nproc)
    return row


def write(rows: list[dict], env: dict) -> Path:
    """Merge ``rows`` into the results JSON (rows of other invocations kept) and write the table."""
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = "multi_gpu_" + env["gpu"].replace(" ", "_")
    path = out / f"{stem}.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    names = {r["run"] for r in rows}
    rows = [r for r in old if r["run"] not in names] + rows   # rows of other invocations kept
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    def key(r):   # rows compare with the 1-GPU row of the same compile setting, quant and per-GPU batch
        return r["compiled"], r["quant"], _per_gpu_batch(r)

    base = {key(r): r for r in rows
            if r["gpus"] == 1 and r.get("tokens_per_s_steady") and not r["run"].startswith("resume_")}
    lines = [f"# Multi-GPU training, Qwen2-VL-7B shapes (random weights) — {env['gpu']}", "",
             f"configs/qwen2_vl_7b_qlora.yaml, global batch 16 (per-GPU batch in the row); torch {env['torch']}, "
             f"transformers {env['transformers']}, accelerate {env['accelerate']}. "
             "Steady tokens/s: optimizer steps 3.. (compile excluded), all GPUs.", "",
             "| run | GPUs | per-GPU batch | quant | compiled | optimizer | steady tokens/s | × 1 GPU | load peak / GPU (GiB) "
             "| training peak / GPU (GiB) | × 1 GPU | steps | final loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['run']} | {r['gpus']} | | | | | not run: {r['skipped']} | | | | | | |")
            continue
        if r["returncode"] != 0:
            lines.append(f"| {r['run']} | {r['gpus']} | | {r.get('quant', '')} | | | failed (rc {r['returncode']}): "
                         f"{_last_error(r)} | | | | | | |")
            continue
        ref = base.get(key(r))
        speed = (f"{r['tokens_per_s_steady'] / ref['tokens_per_s_steady']:.2f}"
                 if ref and r.get("tokens_per_s_steady") and r is not ref else "")
        mem = f"{max(r['peak_mem_gib_per_gpu']) / max(ref['peak_mem_gib_per_gpu']):.2f}" if ref and r is not ref else ""
        steady = f"{r['tokens_per_s_steady']:.0f}" if r.get("tokens_per_s_steady") else "n/a"
        lines.append(f"| {r['run']} | {r['gpus']} | {_per_gpu_batch(r)} | {r['quant']} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r['optimizer']} | {steady} | {speed} | "
                     f"{', '.join(map(str, r['load_peak_mem_gib_per_gpu']))} | "
                     f"{', '.join(map(str, r['peak_mem_gib_per_gpu']))} | {mem} | {r['steps']} | "
                     f"{r['final_loss']:.4f} |")
    curves = {r["run"]: dict(r["loss_history"]) for r in rows if r.get("loss_history")}
    if len(curves) > 1:
        lines += ["", "Loss per optimizer step (same global batch, same data order):", "",
                  "| step | " + " | ".join(curves) + " |", "| --- |" + " --- |" * len(curves)]
        for step in sorted({s for c in curves.values() for s in c}):
            lines.append(f"| {step} | " + " | ".join(f"{c[step]:.4f}" if step in c else "" for c in curves.values())
                         + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def _per_gpu_batch(r: dict) -> int:
    for part in r["command"].split():
        if part.startswith("training.batch_size="):
            return int(part.split("=")[1])
    return 2   # the config's


def _last_error(r: dict) -> str:
    lines = [ln for ln in r.get("error_tail", "").splitlines() if ln.startswith("error:")]
    return (lines[-1] if lines else "see the JSON").replace("|", "/")[:200]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--resume-steps", type=int, default=4)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--runs", default="1gpu_eager,fsdp2,lora16_1gpu,lora16_fsdp2")
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
        rows.append(run(name, model, data, root, args.steps, args.resume_steps))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "error_tail"}), flush=True)
        if rows[-1].get("error_tail"):
            print(rows[-1]["error_tail"])
        write(rows, env)   # after every row: a run cut short by a time limit keeps what it measured
    return 0 if all(r.get("returncode") in (0, None) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
