"""The shipped YAML configs, unchanged, train a few steps on random full-size models (issue 6).

    source benchmarks/device_install.sh            # on the device (carry .whl/bitsandbytes-*.whl)
    python benchmarks/config_runs.py --steps 6
    python benchmarks/config_runs.py --runs 2b_lora --extra training.compile=true
    python benchmarks/config_runs.py --runs qwen3_vl_8b,gemma3_4b,gemma3_12b,mistral_24b --steps 3 --cleanup
    python benchmarks/config_runs.py --runs gemma3_4b --steps 1 --tiny   # CPU smoke: shrunk model, fp32
    python benchmarks/config_runs.py --runs mistral_24b --build-only      # the random checkpoint only

On the device (10 minutes a call), one call per run; the 24B in two, build then run (the build is
kept: a folder with its config.json is reused, a partial one from a killed build is removed):
    (a) --runs qwen3_vl_8b --steps 3 --cleanup       ~4 min (build 17.5 GB ~1 min)
    (b) --runs gemma3_4b --steps 3 --cleanup         ~3 min
    (c) --runs gemma3_12b --steps 3 --cleanup        ~5 min (build 24 GB ~1.5 min)
    (d) --runs mistral_24b --build-only              ~3 min (48 GB written in 4 GB shards)
    (e) --runs mistral_24b --steps 3 --cleanup       ~6 min (the dynamic policy reads the 48 GB twice)
Each call rewrites config_runs_<GPU>.{json,md} with the runs of that call only: keep each call's files.

Each run is ``vlm train configs/<name>.yaml`` in its own process with only these overrides:
model.path (a random-weight checkpoint at the config's real shapes, benchmarks/random_qwen2_vl.py and
benchmarks/random_vlms.py, written in bf16 shard by shard; ``--cleanup`` deletes each after its run:
the 24B one is 48 GB of a device's 64 GiB disk),
data.train (``vlm.data_formats.synthetic`` scenes at 448 × 448, ShareGPT JSON), output,
training.max_steps, training.save_steps (= max_steps: the final checkpoint is written and checked),
logging to the console every step. Recorded from the run's summary.json: steps, tokens/s, peak GPU
memory, losses, the kernel patch report, and whether the adapter folder loads in plain PEFT.
Writes benchmarks/results/config_runs_<GPU>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
GiB = 2**30
RUNS = {"2b_lora": ("qwen2_vl_2b_lora.yaml", "2b"), "7b_qlora": ("qwen2_vl_7b_qlora.yaml", "7b"),
        "qwen3_vl_8b": ("qwen3_vl_8b_qlora.yaml", "qwen3_vl_8b"), "gemma3_4b": ("gemma3_4b_lora.yaml", "gemma3_4b"),
        "gemma3_12b": ("gemma3_12b_qlora.yaml", "gemma3_12b"),
        "mistral_24b": ("mistral_small_3_1_24b_qlora.yaml", "mistral_small_3_1_24b")}


# --tiny: the same config on a shrunk model on the CPU (fp32, no 4-bit, no Triton, plain AdamW)
TINY_OVERRIDES = ["model.device=cpu", "model.dtype=fp32", "training.precision=fp32", "quant=none",
                  "kernels=false", "training.optimizer=adamw", "training.batch_size=1", "training.grad_accum=1",
                  "training.gradient_checkpointing=false", "data.max_length=512"]


def build_random(root: Path, size: str, tiny: bool = False) -> Path:
    """The random checkpoint for a run: Qwen2-VL 2B/7B, or one of random_vlms.SIZES."""
    if size in ("2b", "7b"):
        from random_qwen2_vl import build

        return build(root, size)
    from random_vlms import build

    return build(root, size, tiny=tiny)


def adapter_loads(adapter: Path, model: Path) -> str:
    """Load the saved adapter onto the base with plain transformers + PEFT (fresh process)."""
    # on the GPU where there is one: the 24B base is 48 GB, slow to materialise in host memory
    code = ("import sys, torch; from transformers import AutoModelForImageTextToText; from peft import PeftModel;"
            "dev = 'cuda' if torch.cuda.is_available() else 'cpu';"
            "m = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map=dev);"
            "p = PeftModel.from_pretrained(m, sys.argv[2]);"
            "print('ok', sum(x.numel() for n, x in p.named_parameters() if 'lora_' in n))")
    r = subprocess.run([sys.executable, "-c", code, str(model), str(adapter)], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "failed: " + r.stderr.strip()[-400:]


def run(name: str, model: Path, data: Path, root: Path, steps: int, extra: list[str]) -> dict:
    config = REPO / "configs" / RUNS[name][0]
    out = root / f"run_{name}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "vlm", "train", str(config), f"model.path={model}", f"data.train=[{data}]",
           f"output={out}", f"training.max_steps={steps}", f"training.save_steps={steps}",
           "logging.tensorboard=false", "logging.progress=false", "training.logging_steps=1", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    row = {"run": name, "config": f"configs/{RUNS[name][0]}", "overrides": cmd[5:], "returncode": r.returncode,
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    print(r.stdout[-2500:], r.stderr[-2500:] if r.returncode else "", flush=True)
    if r.returncode != 0:
        row["error_tail"] = (r.stdout[-1500:] + "\n" + r.stderr[-3000:]).strip()
        return row
    s = json.loads((out / "summary.json").read_text())
    row.update(steps=s["steps"], tokens=s["tokens"], tokens_per_s=s["tokens_per_s"],
               train_seconds=s["train_seconds"], peak_mem_gib=round(s["peak_memory_bytes"] / GiB, 2),
               losses=[loss for _, loss in s["loss_history"]],
               final_loss=s["final_loss"], kernels=(s.get("kernels") or {}).get("counts"),
               quant=s.get("quant"), batch=s["config"]["training"]["batch_size"],
               grad_accum=s["config"]["training"]["grad_accum"],
               checkpoints=sorted(p.name for p in out.glob("checkpoint-*")),
               adapter_plain_peft=adapter_loads(out / "adapter", model))
    return row


def write(rows: list[dict], env: dict) -> None:
    import os

    stem = "config_runs_" + env["gpu"].replace(" ", "_")
    outs = {REPO / "benchmarks" / "results", Path(os.environ.get("OUT", REPO / "benchmarks" / "results"))}
    # runs of earlier calls on this GPU (the big ones take a call each) stay in the file, in RUNS order
    earlier = REPO / "benchmarks" / "results" / f"{stem}.json"
    if earlier.is_file():
        done = {r["run"] for r in rows}
        kept = [r for r in json.loads(earlier.read_text())["rows"] if r["run"] not in done]
        order = list(RUNS)
        rows = sorted(kept + rows, key=lambda r: order.index(r["run"]) if r["run"] in order else len(order))
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2, default=str) + "\n")
    lines = [f"# Shipped configs on random full-size models — {env['gpu']}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}; {env['steps']} optimizer steps per run. tokens/s is "
             "`vlm train`'s own figure over all the run's steps, the first step's compile included: with a "
             "few steps it shows the run works, not its speed (the step benchmarks measure speed).", "",
             "| config | overrides beyond paths/steps | steps | batch × accum | tokens/s | peak GiB | "
             "first → last loss | adapter loads in PEFT |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["returncode"] != 0:
            lines.append(f"| {r['config']} | | failed (rc {r['returncode']}) | | | | | |")
            continue
        extra = " ".join(o for o in r["overrides"][6:] if not o.startswith(("logging.", "training.logging")))
        ls = r["losses"] or [r["final_loss"]]
        lines.append(f"| {r['config']} | {extra or '—'} | {r['steps']} | {r['batch']} × {r['grad_accum']} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_mem_gib']} | {ls[0]:.4f} → {ls[-1]:.4f} | "
                     f"{r['adapter_plain_peft']} |")
    for out in outs:
        (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--runs", default="2b_lora,7b_qlora")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    ap.add_argument("--root", default="/tmp/vlm_config_runs")
    ap.add_argument("--cleanup", action="store_true", help="delete each random checkpoint after its run")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on shrunk models (new families only)")
    ap.add_argument("--build-only", action="store_true",
                    help="build the runs' random checkpoints (kept for a later call) and stop")
    args = ap.parse_args(argv)

    import peft
    import torch
    import transformers

    from vlm.data_formats.synthetic import generate

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "data"
    data = data_dir / "sharegpt.json"
    if not data.is_file():
        data = Path(generate(data_dir, n=8 if args.tiny else 256, seed=0, image_size=448).sharegpt_json)
    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "missing"
    env = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "bitsandbytes": bnb, "python": platform.python_version(), "steps": args.steps}
    rows = []
    for name in args.runs.split(","):
        t0 = time.perf_counter()
        model = build_random(root, RUNS[name][1], tiny=args.tiny)
        build_s = round(time.perf_counter() - t0, 1)
        print(f"{name}: checkpoint {model} ready in {build_s} s", flush=True)
        if args.build_only:
            continue
        print(f"{name}: running ...", flush=True)
        rows.append(run(name, model, data, root, args.steps, (TINY_OVERRIDES if args.tiny else []) + args.extra))
        rows[-1]["build_seconds"] = build_s   # 0 when an earlier call built it
        if args.cleanup:
            shutil.rmtree(model, ignore_errors=True)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "error_tail"}, default=str), flush=True)
        if not args.tiny:   # a smoke run records nothing in benchmarks/results
            write(rows, env)
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
