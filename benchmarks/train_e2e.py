"""`vlm train` end to end on realistic data, beside transformers Trainer + PEFT, in one invocation.

    source benchmarks/device_install.sh         # on the device (carry .whl/bitsandbytes-*.whl for QLoRA)
    python benchmarks/train_e2e.py --out /tmp/e2e --results $OUT --models 2b_lora --rows hf,vlmtune --steps 16 --warmup 4 --samples 500
    python benchmarks/train_e2e.py --out /tmp/e2e --results $OUT --models 7b_qlora --rows hf,vlmtune --steps 12 --warmup 4 --samples 500
    python benchmarks/train_e2e.py --out /tmp/e2e --results $OUT --models 2b_full --rows hf,vlmtune --steps 16 --warmup 4 --samples 500
    python benchmarks/train_e2e.py --tiny --device cpu --out DIR     # CPU smoke run of every row

Data: ``vlm.data_formats.synthetic_mixed`` (images 224² up to 1344 × 1008 with portrait/landscape
extremes, 10 % multi-image, a few text-only records, 1–6 turns, answers 3–600 words), the same files
for every row. Models: random-weight Qwen2-VL at the real 2B / 7B shapes (benchmarks/random_qwen2_vl.py;
``--tiny``: the zoo's tiny Qwen2-VL). Each row is its own process:

- ``vlmtune``: the real CLI, ``vlm train configs/<config>.yaml`` with only paths, steps and logging
  overridden (checkpoint saving lies outside the timed steps) — whatever the shipped config does is
  what is measured;
- ``vlmtune_warm``: the vlmtune row again, after it: startup with a warm compile cache (inductor's
  FX-graph and AOTAutograd caches, on by default, filled by the first run);
- ``vlmtune_mask``: the vlmtune row with ``training.packed_attention=mask``: packed rows attend
  through transformers' L×L block mask instead of the varlen kernels (an ablation of varlen);
- ``vlmtune_padded``: the same with ``data.max_tokens_per_batch=null`` and the sample-count batch the
  configs shipped before (2B: 4 × 4, 7B: 2 × 8; length-grouped, padded): an ablation of packing;
- ``hf``: transformers Trainer + PEFT as their docs set it up (benchmarks/train_e2e_hf.py):
  gradient checkpointing, bf16, dynamic padding, ``HF_BATCH`` samples per micro-batch, and gradient
  accumulation to about the same tokens per optimizer step as the vlmtune row.

Model ``2b_full`` is full fine-tuning (``configs/qwen2_vl_2b_full.yaml``, ``method: full``: bf16
weights, grads and BF16AdamW moments, packed rows): its ``hf`` row is Trainer full fine-tuning
without PEFT, ``bf16=True`` mixed precision on fp32 weights (fp32 master weights, 16 bytes per
trained parameter), the same trained parameters, gradient checkpointing as the docs recommend,
Trainer's default fused AdamW, the config's lr / warmup / max_grad_norm. (Fixed-shape step ratios
of the same comparison: benchmarks/train_modes.py --parts full.)

Per row: steady-state non-padding tokens/s (optimizer steps after ``--warmup``, so compile and the
first-batch costs are out), startup (process start → first optimizer step done, and where it went),
padding fraction of the tokens computed, share of steady step time spent blocked on the DataLoader,
peak memory, loss at the last step (mean of the last 3). Writes ``train_e2e_<gpu|tiny>.{json,md}``
in --results (default --out; a second invocation with the same --out reuses data and checkpoints).
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
GiB = 2**30
MODELS = {"2b_lora": ("qwen2_vl_2b_lora.yaml", "2b", False), "7b_qlora": ("qwen2_vl_7b_qlora.yaml", "7b", True),
          "2b_full": ("qwen2_vl_2b_full.yaml", "2b", False)}
# the sample-count batches the configs shipped with before token budgets (vlmtune_padded row)
PADDED_BATCH = {"2b_lora": (4, 4), "7b_qlora": (2, 8), "2b_full": (4, 4)}
ROWS = ("hf", "vlmtune", "vlmtune_warm", "vlmtune_mask", "vlmtune_padded")
HF_BATCH = 4
# --tiny: CPU-sized data and limits (the shipped config otherwise, so the smoke run takes its code paths)
TINY_OVERRIDES = ["model.device=cpu", "model.dtype=fp32", "training.precision=fp32", "data.min_pixels=3136",
                  "data.max_pixels=12544", "data.max_length=512", "data.max_tokens_per_batch=1024",
                  "training.optimizer=adamw", "quant=null"]
# --tiny, method full: bf16 weights and precision (fp32 weights would take Trainer's own optimizer,
# not BF16AdamW, which is what the 2b_full row is about)
TINY_FULL = ["model.dtype=bf16", "training.precision=bf16"]


def tiny_overrides(name: str) -> list[str]:
    if MODELS[name][0] == "qwen2_vl_2b_full.yaml":
        return [o for o in TINY_OVERRIDES if o.split("=")[0] not in ("model.dtype", "training.precision")] + TINY_FULL
    return TINY_OVERRIDES


def load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def steady(summary: dict, warmup: int, drop_last: int = 0) -> dict:
    """Rates over the optimizer steps after ``warmup`` (from the per-step clock in summary.json),
    leaving out the last ``drop_last`` (profiled steps run slower)."""
    steps = (summary.get("step_times") or [])
    steps = steps[:len(steps) - drop_last]
    # vlm train's own window start (after its last compile, vlm.train.trainer), when later than ours
    warmup = max(warmup, (summary.get("steady_after_step") or 0) - 1)
    if len(steps) <= warmup + 1:
        return {"steady_tokens_per_s": None, "data_wait_share": None, "steady_steps": 0}
    (_, t0, k0, w0), (_, t1, k1, w1) = steps[warmup], steps[-1]
    return {"steady_tokens_per_s": round((k1 - k0) / (t1 - t0), 1) if t1 > t0 else None,
            "data_wait_share": round((w1 - w0) / (t1 - t0), 4) if t1 > t0 else None,
            "steady_steps": len(steps) - 1 - warmup,
            "step_seconds": round((t1 - t0) / (len(steps) - 1 - warmup), 4)}


def row_result(row: str, model: str, summary: dict, warmup: int, wall: float, extra: dict) -> dict:
    losses = [loss for _, loss in summary.get("loss_history", [])]
    startup = summary.get("startup_seconds") or {}
    profiled = ((summary.get("config") or {}).get("logging") or {}).get("profile_steps")
    return {"row": row, "model": model, **steady(summary, warmup, 2 if profiled else 0),
            "startup_s": startup.get("to_first_step_s"), "startup": startup,
            "padding_fraction": summary.get("padding_fraction"), "peak_mem_gib": round(summary["peak_memory_bytes"] / GiB, 2),
            "steps": summary.get("steps"), "final_loss": losses[-1] if losses else None,
            "loss_last3": round(sum(losses[-3:]) / len(losses[-3:]), 4) if losses else None,
            "first_loss": losses[0] if losses else None, "tokens": summary.get("tokens"),
            "computed_tokens": summary.get("computed_tokens"), "workers": summary.get("dataloader_workers"),
            "trained_parameters": summary.get("trainable_parameters") or summary.get("trained_parameters"),
            "optimizer": summary.get("optimizer"),
            "wall_s": round(wall, 1), **extra}


def run_vlm(row: str, name: str, ckpt: Path, data: Path, root: Path, args) -> tuple[dict, dict]:
    config = REPO / "configs" / MODELS[name][0]
    out = root / f"{name}_{row}"
    cmd = [sys.executable, "-m", "vlm", "train", str(config), f"model.path={ckpt}", f"data.train=[{data}]",
           f"output={out}", f"training.max_steps={args.steps}", f"training.save_steps={args.steps + 1000}",
           "logging.tensorboard=false", "logging.progress=false", "training.logging_steps=1",
           *(tiny_overrides(name) if args.tiny else []), *args.extra]
    if args.profile and row == "vlmtune":   # the last two steps (left out of the steady rate)
        cmd += [f"logging.profile_steps=[{args.steps - 1},{args.steps}]"]
    if row == "vlmtune_mask":
        cmd += ["training.packed_attention=mask"]
    if row == "vlmtune_padded":
        bs, accum = PADDED_BATCH[name]
        cmd += ["data.max_tokens_per_batch=null", f"training.batch_size={bs}", f"training.grad_accum={accum}"]
    return _run(cmd, out), {"command": " ".join(cmd[2:])}


def hf_spec(name: str, ckpt: Path, data: Path, root: Path, args, vlm_tokens_per_step: float | None) -> dict:
    """The baseline's settings, read from the same shipped config (method, LoRA, lr, limits, optimizer)."""
    cfg = load_yaml(REPO / "configs" / MODELS[name][0])
    from vlm.train.recipe import _optimizer_name

    over = dict(o.split("=", 1) for o in (TINY_OVERRIDES if args.tiny else []))
    method = cfg.get("method", "lora")
    tr = cfg["training"]
    if method == "full":   # Trainer full fine-tuning: no LoRA; its default optimizer (fused AdamW on a GPU)
        from vlm.families import get_family
        from vlm.train.config import parse_config
        from vlm.train.modes import trainable_components

        parsed = parse_config({**cfg, "model": {**cfg["model"], "path": str(ckpt)}, "data": {**cfg["data"], "train": [str(data)]}})
        method_keys = {"method": "full", "trained_components": list(trainable_components(get_family("qwen2_vl"), parsed)),
                       "optim": "adamw_torch" if args.tiny else "adamw_torch_fused"}
    else:
        method_keys = {"method": "lora", "lora_r": cfg["lora"]["r"], "lora_alpha": cfg["lora"]["alpha"],
                       "optim": _optimizer_name(over.get("training.optimizer", tr["optimizer"]))}
    mean_len = mean_sample_tokens(root)
    # same tokens per optimizer step as the vlmtune row, in samples of HF_BATCH
    accum = max(1, round((vlm_tokens_per_step or HF_BATCH * mean_len * 4) / (HF_BATCH * mean_len)))
    return {"model": str(ckpt), "data": str(data), "output": str(root / f"{name}_hf"), "steps": args.steps,
            "device": "cpu" if args.tiny else "cuda", "dtype": "fp32" if args.tiny else "bf16",
            "qlora": MODELS[name][2] and not args.tiny,
            "max_length": int(over.get("data.max_length", cfg["data"]["max_length"])),
            "min_pixels": int(over.get("data.min_pixels", cfg["data"]["min_pixels"])),
            "max_pixels": int(over.get("data.max_pixels", cfg["data"]["max_pixels"])),
            **method_keys, "lr": float(tr["lr"]), "warmup_ratio": float(tr["warmup_ratio"]), "seed": tr["seed"],
            "weight_decay": float(tr.get("weight_decay", 0.0)), "max_grad_norm": float(tr.get("max_grad_norm", 1.0)),
            "batch_size": HF_BATCH, "grad_accum": accum, "workers": 0 if args.tiny else args.hf_workers}


def mean_sample_tokens(root: Path) -> float:
    stats = json.loads((root / "data_stats.json").read_text())
    return stats["tokens"] / stats["samples"]


def run_hf(name: str, ckpt: Path, data: Path, root: Path, args, vlm_tokens_per_step) -> tuple[dict, dict]:
    spec = hf_spec(name, ckpt, data, root, args, vlm_tokens_per_step)
    path = root / f"{name}_hf_spec.json"
    path.write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_e2e_hf.py"), str(path)]
    return _run(cmd, Path(spec["output"])), {"batch": f"{HF_BATCH} samples × {spec['grad_accum']}",
                                             "workers": spec["workers"]}


def _run(cmd: list[str], out: Path) -> dict:
    """Run one row's process with its whole output streamed to OUT/run.log as it comes (a row cut by
    a time limit, the row's own ``E2E_ROW_TIMEOUT`` seconds or the caller's, still leaves its log)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    limit = float(os.environ["E2E_ROW_TIMEOUT"]) if os.environ.get("E2E_ROW_TIMEOUT") else None
    log = out / "run.log"
    with open(log, "w") as sink:
        try:
            rc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env,
                                timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = f"cut after {limit:.0f} s (E2E_ROW_TIMEOUT)"
    text = log.read_text(errors="replace")
    tail = [line for line in text.splitlines()
            if line.startswith(("startup:", "data:", "torch.compile", "warning", "attention:"))]
    print("\n".join(tail), flush=True)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (rc {rc}); its output ({log}) ends:\n{text[-5000:]}")
    return json.loads((out / "summary.json").read_text())


def prepare_data(root: Path, args) -> Path:
    from vlm.data_formats.synthetic_mixed import generate

    data_dir = root / "data"
    train = data_dir / "train.json"
    if not train.is_file():
        generate(data_dir, n=args.samples, seed=0, scale=0.125 if args.tiny else 1.0)
    return train


def data_stats(root: Path, ckpt: Path, data: Path, name: str, args) -> dict:
    """Sample lengths as the collator plans them (tokens per sample, truncation) for the table."""
    from transformers import AutoProcessor

    from vlm.data_formats.collator import VisionChatCollator
    from vlm.data_formats.prepare import prepare_samples
    from vlm.data_formats.resolution import Resolution
    from vlm.data_formats.torch_datasets import load_training_data
    from vlm.families import get_family

    cfg = load_yaml(REPO / "configs" / MODELS[name][0])
    over = dict(o.split("=", 1) for o in (TINY_OVERRIDES if args.tiny else []))
    res = Resolution(min_pixels=int(over.get("data.min_pixels", cfg["data"]["min_pixels"])),
                     max_pixels=int(over.get("data.max_pixels", cfg["data"]["max_pixels"])))
    collator = VisionChatCollator(AutoProcessor.from_pretrained(ckpt), get_family("qwen2_vl"),
                                  max_length=int(over.get("data.max_length", cfg["data"]["max_length"])), resolution=res)
    prepared = prepare_samples(load_training_data(str(data)), collator)
    lengths = prepared.lengths
    stats = {"samples": len(lengths), "tokens": sum(lengths), "min": min(lengths), "max": max(lengths),
             "mean": round(sum(lengths) / len(lengths), 1), **prepared.stats}
    (root / "data_stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def build_checkpoint(root: Path, size: str, tiny: bool) -> Path:
    if tiny:
        from vlm.zoo import build_tiny

        path = root / "tiny_qwen2_vl"
        return path if (path / "config.json").is_file() else build_tiny("qwen2_vl", path, seed=0)
    code = ("import sys; sys.path.insert(0, sys.argv[3]); from pathlib import Path; from random_qwen2_vl import build;"
            "print(build(Path(sys.argv[1]), sys.argv[2]))")
    r = subprocess.run([sys.executable, "-c", code, str(root), size, str(REPO / "benchmarks")],
                       capture_output=True, text=True, check=True)   # own process: the parent holds no GPU memory
    return Path(r.stdout.strip().splitlines()[-1])


def table(rows: list[dict], env: dict) -> str:
    lines = [f"# `vlm train` end to end on realistic data — {env['gpu']}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; {env['steps']} optimizer "
             f"steps per row, steady state = steps after {env['warmup']}. Data: {env['data']}.", "",
             "| model | row | batch | steady tokens/s | × hf | startup s (load / data / first step) | padding | "
             "data wait | peak GiB | loss (last 3) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['row']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        base = next((b for b in rows if b["model"] == r["model"] and b["row"] == "hf" and "error" not in b), None)
        ratio = (f"{r['steady_tokens_per_s'] / base['steady_tokens_per_s']:.2f}"
                 if base and r["steady_tokens_per_s"] and base["steady_tokens_per_s"] else "—")
        s = r["startup"]
        lines.append(f"| {r['model']} | {r['row']} | {r.get('batch', '')} | {r['steady_tokens_per_s']} | {ratio} | "
                     f"{r['startup_s']} ({s.get('load_s')} / {s.get('data_s')} / {s.get('first_step_s')}) | "
                     f"{r['padding_fraction']:.1%} | {(r['data_wait_share'] or 0):.1%} | {r['peak_mem_gib']} | "
                     f"{r['loss_last3']} |")
    return "\n".join(lines) + "\n" + startup_table(rows)


def startup_table(rows: list[dict]) -> str:
    """Startup opened up, per row that reports it (vlm.train.startup_clock): the imports' slowest
    packages, and the first step's torch.compile time by phase with its cache hits vs the rest."""
    lines = []
    for r in rows:
        s = r.get("startup") or {}
        c = s.get("first_step_compile")
        if "error" in r or not (s.get("imports_split") or c):
            continue
        imports = ", ".join(f"{k} {v}" for k, v in list((s.get("imports_split") or {}).items())[:6])
        nopyc = s.get("imports_without_pyc") or {}
        if nopyc.get("modules"):
            imports += f"; no .pyc: {nopyc['modules']} modules, {nopyc['s']} s"
        if c and c.get("frames"):
            fx, aot = c["fx_graph_cache"], c["aot_autograd_cache"]
            compiled = (f"{s.get('first_step_compile_s')} = trace {c['dynamo_trace_s']} + AOT/inductor "
                        f"{c['backend_s']} (cache loads {c['cache_load_s']}) + backward {c['backward_s']}; "
                        f"autotune {c['autotune_s']}; {c['frames']} frames, {c['graphs']} graphs; FX cache "
                        f"{fx['hit']}/{fx['miss']}, AOT cache {aot['hit']}/{aot['miss']} (hit/miss)")
        else:
            compiled = "— (nothing compiled)"
        if c and c.get("frames_traced"):
            from vlm.train.startup_clock import describe_frames

            compiled += f"; traced: {describe_frames(c['frames_traced'])}"
        compiled = f"setup {s.get('first_step_setup_s')}; " + compiled + (
            "" if s.get("compile_workers_ready") is None else f"; compile workers ready: {s['compile_workers_ready']}")
        lines.append(f"| {r['model']} | {r['row']} | {s.get('imports_s')}: {imports} | {setup_steps(s)} | {compiled} | "
                     f"{s.get('first_step_run_s')} (data wait {s.get('first_step_data_wait_s')}) |")
    if not lines:
        return ""
    return "\n".join(["", "Startup opened up (seconds; `summary.json` `startup_seconds`):", "",
                      "| model | row | imports: slowest packages | LoRA + fast path: steps (process CPU) | "
                      "first step: Trainer setup; compile | first step: run |",
                      "|---|---|---|---|---|---|", *lines]) + "\n"


def setup_steps(startup: dict) -> str:
    """The LoRA + fast path phase by step, its process CPU time, and whether inductor's compile
    workers were up when it began (``lora_and_fast_path_split``)."""
    split = startup.get("lora_and_fast_path_split")
    if not split:
        return str(startup.get("lora_and_fast_path_s"))
    steps = ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in split.items()
                      if k.endswith("_s") and k not in ("cpu_s", "wall_s"))
    ready = split.get("compile_workers_ready_at_start")
    imported = split.get("imports_in_phase") or {}
    if imported.get("s"):
        steps += "; first imports " + ", ".join(f"{k} {v}" for k, v in imported.items())
    return (f"{split['wall_s']} = {steps} (CPU {split['cpu_s']})"
            + ("" if ready is None else f"; compile workers up at its start: {ready}"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="work folder: data, checkpoints, run outputs")
    ap.add_argument("--results", help="where train_e2e_<gpu>.{json,md} go (default: --out)")
    ap.add_argument("--tiny", action="store_true", help="the zoo's tiny Qwen2-VL and small images (CPU smoke run)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--models", default="2b_lora,7b_qlora")
    ap.add_argument("--rows", default="hf,vlmtune")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8, help="optimizer steps left out of the steady state")
    ap.add_argument("--samples", type=int, default=800)
    ap.add_argument("--hf-workers", type=int, default=4, help="DataLoader workers of the hf row (as vlm's auto)")
    ap.add_argument("--profile", action="store_true",
                    help="vlmtune row: torch.profiler table of two steady steps (OUT/<model>_vlmtune/profile.txt)")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for the vlmtune rows")
    args = ap.parse_args(argv)
    if args.tiny and args.device != "cpu":
        ap.error("--tiny runs on --device cpu")
    if args.tiny:
        args.models = args.models if args.models != "2b_lora,7b_qlora" else "2b_lora"
        args.samples = min(args.samples, 24)
    rows_wanted = args.rows.split(",")
    for r in rows_wanted:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; choose from {', '.join(ROWS)}")

    import peft
    import torch
    import transformers

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_data(root, args)
    env = {"gpu": "tiny" if args.tiny else torch.cuda.get_device_name(0), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
           "steps": args.steps, "warmup": args.warmup, "data_seconds": round(time.perf_counter() - t0, 1)}
    rows = []
    # vlmtune rows first: the hf row's accumulation matches their tokens per optimizer step
    order = sorted((r for r in rows_wanted if r != "hf"), key=ROWS.index) + (["hf"] if "hf" in rows_wanted else [])
    for name in args.models.split(","):
        if name not in MODELS:
            ap.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        ckpt = build_checkpoint(root, MODELS[name][1], args.tiny)
        stats = data_stats(root, ckpt, data, name, args)
        env["data"] = (f"{stats['samples']} samples, {stats['min']}–{stats['max']} tokens (mean {stats['mean']}), "
                       f"{stats['image_tokens']} image / {stats['text_tokens']} text tokens, {stats['truncated']} truncated")
        tokens_per_step = None
        for row in order:
            print(f"{name} / {row}: running ...", flush=True)
            t = time.perf_counter()
            try:
                if row == "hf":
                    summary, extra = run_hf(name, ckpt, data, root, args, tokens_per_step)
                else:
                    summary, extra = run_vlm(row, name, ckpt, data, root, args)
                    if row == "vlmtune" and summary.get("steps"):
                        tokens_per_step = summary["tokens"] / summary["steps"]
                    if summary.get("config"):   # every vlmtune row: its own batching (token budget or samples)
                        budget = (summary.get("data") or {}).get("token_budget") or {}
                        tr = summary["config"]["training"]
                        extra["batch"] = (f"≤{budget['max_tokens_per_batch']} tokens × {tr['grad_accum']}" if budget
                                          else f"{tr['batch_size']} samples × {tr['grad_accum']}")
                rows.append(row_result(row, name, summary, args.warmup, time.perf_counter() - t, extra))
            except Exception as e:   # one failed row must not lose the others
                rows.append({"row": row, "model": name, "error": str(e)[-3000:]})
                print(rows[-1]["error"], flush=True)
            print(json.dumps(rows[-1], default=str)[:1500], flush=True)
            write(Path(args.results or root), rows, env)
    print(table(rows, env))
    return 0 if all("error" not in r for r in rows) else 1


def write(root: Path, rows: list[dict], env: dict) -> None:
    from vlm.atomic import write_json, write_text

    stem = "train_e2e_" + env["gpu"].replace(" ", "_")
    path = root / f"{stem}.json"
    if path.is_file():   # keep the other models' rows of an earlier invocation (one model per call)
        new = {(r["model"], r["row"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"] if (r["model"], r["row"]) not in new] + rows
    root.mkdir(parents=True, exist_ok=True)
    write_json(path, {"env": env, "rows": rows})
    write_text(root / f"{stem}.md", table(rows, env))


if __name__ == "__main__":
    sys.exit(main())
