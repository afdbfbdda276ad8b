"""Qwen2-VL-7B on 1 GPU vs 2 GPUs (FSDP2 and DDP) through `vlm train`, on realistic data — issue 19.

    source benchmarks/device_install.sh        # on the device (carry .whl/bitsandbytes-*.whl)
    python benchmarks/multi_gpu.py --runs 1gpu_eager,fsdp2,resume_fsdp2_on_1gpu,resume_1gpu_on_fsdp2 --steps 10
    python benchmarks/multi_gpu.py --runs 1gpu,ddp2,ddp2_eager,fsdp2_compiled --steps 10
    python benchmarks/multi_gpu.py --runs lora16_1gpu,lora16_fsdp2 --steps 10
    python benchmarks/multi_gpu.py --runs lora16_fsdp2,lora16_fsdp2_vb,lora16_1gpu --steps 6   # FSDP2 memory: peaks + the peak's phase
    python benchmarks/multi_gpu.py --runs 1gpu_eager,fsdp2 --extra kernels=false --tag nk     # rows with overrides
    python benchmarks/multi_gpu.py --model 2b --runs 1gpu,ddp2,fsdp2_compiled --steps 8   # fits one device call
    python benchmarks/multi_gpu.py --model 2b --runs 1gpu,fsdp2_compiled,fsdp2_compiled_fast --steps 12   # FSDP2 layouts
    python benchmarks/multi_gpu.py --tiny --device cpu --root DIR --runs 1gpu_eager,fsdp2   # CPU smoke (gloo)
    python benchmarks/multi_gpu.py --model 2b --runs 1gpu_eager,fsdp2 --steps 16 --profile   # + per-rank profiles
    python benchmarks/multi_gpu.py --model 2b --runs full_1gpu,full_fsdp2,full8_1gpu,full8_fsdp2 --steps 8

What runs: ``vlm train configs/qwen2_vl_7b_qlora.yaml`` unchanged (dynamic 4-bit policy, adamw_8bit,
packed token-budget batches) except for paths, steps, logging and the row's overrides below, on a
random-weight model with Qwen2-VL-7B's full shapes (benchmarks/random_qwen2_vl.py; ``--tiny``: the
zoo's tiny Qwen2-VL). Data: the end-to-end benchmark's (benchmarks/train_e2e.py:
``vlm.data_formats.synthetic_mixed``, images 224² up to 1344 × 1008, 1–6 turns, answers 3–600 words).

Batches (``--batching tokens``, the default): the config's token budget, packed rows of <= 8192
tokens, 1 row per GPU micro-batch. 1 GPU: grad_accum 2 (the config's); 2 GPUs: grad_accum 1, so
every row steps over the same 2 rows (~16k tokens) per optimizer step in the same order and the loss
curves compare step for step. Each rank packs nothing itself: the rows are planned once (same seed
on every rank) and accelerate hands rank r every other row. ``_r2`` rows: 2 rows per GPU
micro-batch (1 GPU: 2 × accum 2; 2 GPUs: 2 × accum 1), more work per step for each GPU.
``--batching samples``: the sample-count batches of the first measurement (2 samples per GPU, global
16; ``_b8``: 8 per GPU), written to ``multi_gpu_<GPU>`` instead of ``multi_gpu_packed_<GPU>``.

Rows (each a fresh ``vlm train`` process tree, so memory peaks never mix):
  1gpu / 1gpu_eager     one process, compiled (the default) / ``training.compile=false``
  ddp2 / ddp2_eager     ``--nproc 2 distributed.strategy=ddp``: a replica per GPU
  fsdp2                 ``--nproc 2 distributed.strategy=fsdp``: FSDP2 full shard in the default layout
                        (decoder layers grouped by ``fsdp_layers_per_unit`` auto, one unit per frozen
                        vision tower, embeddings, lm_head; vlm.train.fsdp_units), 4-bit weights stored
                        in bf16 so FSDP can shard them, adamw_8bit on the shards; compile auto (16-bit
                        LoRA: compiled, 4-bit: eager); checkpoint at the last step
  fsdp2_compiled        the same with ``training.compile=true`` (compiled layers as FSDP units)
  fsdp2_keep            fsdp2 with ``distributed.fsdp_reshard_after_forward=false``: no backward
                        all-gathers, the whole 16-bit model on each GPU during the step
  fsdp2_l1 / fsdp2_compiled_l1   ``distributed.fsdp_layers_per_unit=1``: a unit per decoder layer (the
                        default, auto, groups layers up to 512 MiB of bf16 weights: 5 per unit at 2B,
                        1 at 7B; vlm.train.fsdp_units)
  fsdp2_compiled_rt     compiled, ``distributed.fsdp_frozen_towers=replicate``: the frozen vision tower
                        left out of FSDP (whole on each GPU: no unit, hooks or all-gather)
  fsdp2_compiled_keep   compiled, reshard_after_forward false (no backward all-gathers)
  fsdp2_compiled_fast   compiled, both: towers replicated and units kept gathered to backward (the
                        speed end of FSDP2 for LoRA; its memory is about DDP's)
  lora16_1gpu / lora16_fsdp2   16-bit LoRA (``quant=bf16``), eager: FSDP's memory case
  lora16_fsdp2_vb       lora16_fsdp2 with ``distributed.fsdp_frozen_towers=blocks``: a unit per vision
                        block (the tower's forward holds ~2 blocks whole instead of the whole tower)
  full_1gpu / full_fsdp2       ``configs/qwen2_vl_2b_full.yaml`` (method full: bf16 weights, BF16AdamW,
                        gradient checkpointing) in the same packed rows (``data.max_tokens_per_batch=
                        8192``), eager, one process / FSDP2 on 2 GPUs: each GPU holds half the weights,
                        grads and optimizer states (and the row reports bytes per trained parameter)
  full8_1gpu / full8_fsdp2     the same with ``training.optimizer=adamw_8bit`` (8-bit moments)
  resume_fsdp2_on_1gpu  resumes fsdp2's checkpoint in one process (2 → 1: grad_accum doubles to keep
                        the global batch) for ``--resume-steps`` more steps
  resume_1gpu_on_fsdp2  resumes 1gpu_eager's checkpoint under FSDP2 on 2 GPUs (1 → 2), likewise
                        (both continue in the resumed run's folder: run them after that run)
"× 1 GPU" compares the steady-state tokens/s (from the last step that compiled in any process, step 2
at the earliest, to the last step: compile and warm-up excluded, summed over processes) with the 1-GPU row of the same compile setting, quantization and
per-GPU batch. Memory per GPU: the load peak (before the first step) and the training peak (from
the first step on), CUDA max allocated; "params / GPU": the parameter bytes each process holds after
wrapping (FSDP: its shards). "data wait": share of rank 0's steady step time spent blocked on the
DataLoader (host-bound input when large).
Writes benchmarks/results/multi_gpu_packed_<GPU>.json and .md (``--tiny``: under --root).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
# --model: the shipped config each size runs (7b: the QLoRA config; 2b: 16-bit LoRA, whose
# rows fit one device call: the 7B checkpoint build + dynamic analysis + compile did not, session 5)
CONFIGS = {"7b": REPO / "configs" / "qwen2_vl_7b_qlora.yaml", "2b": REPO / "configs" / "qwen2_vl_2b_lora.yaml"}
CONFIG = CONFIGS["7b"]
GiB = 2**30
EAGER = ["training.compile=false"]
LORA16 = ["quant=bf16", "training.compile=false"]
# FSDP2 with the decoder layers kept gathered from forward to backward (speed over memory: fsdp_units)
KEEP_GATHERED = ["distributed.fsdp_reshard_after_forward=false"]
# FSDP2 layouts (vlm.train.fsdp_units.Layout): one decoder layer per unit (session 7's layout; the
# default is auto: 5 per unit at 2B, 1 at 7B), frozen towers left out of FSDP, and both speed knobs
PER_LAYER = ["distributed.fsdp_layers_per_unit=1"]
REPLICATE_TOWERS = ["distributed.fsdp_frozen_towers=replicate"]
FAST = REPLICATE_TOWERS + KEEP_GATHERED
# a unit per vision block: the tower's forward holds ~2 blocks whole, not the whole tower (memory)
TOWER_BLOCKS = ["distributed.fsdp_frozen_towers=blocks"]
COMPILED = ["training.compile=true"]
# method full rows: their own shipped config, the LoRA rows' packed-row batching, eager on 1 and 2 GPUs
FULL_CONFIG = REPO / "configs" / "qwen2_vl_2b_full.yaml"
FULL = ["quant=bf16", "data.max_tokens_per_batch=8192", "training.compile=false"]
FULL8 = FULL + ["training.optimizer=adamw_8bit"]
# --tiny: bf16 weights and precision (TINY_OVERRIDES make the LoRA rows fp32), the tiny budget
TINY_FULL = ["model.dtype=bf16", "training.precision=bf16", "data.max_tokens_per_batch=1024"]


def _runs(batching: str) -> dict[str, tuple[int, str | None, list[str]]]:
    """name -> (processes, strategy, overrides) for ``--batching``."""
    if batching == "tokens":   # the config's budget: 1 row per GPU micro-batch, 2 rows per optimizer step
        one, two = ["training.batch_size=1", "training.grad_accum=2"], ["training.batch_size=1", "training.grad_accum=1"]
        wide = ("_r2", ["training.batch_size=2", "training.grad_accum=2"], ["training.batch_size=2", "training.grad_accum=1"])
    else:                      # the first measurement's sample batches: 2 per GPU, global 16
        one = ["data.max_tokens_per_batch=null", "training.batch_size=2", "training.grad_accum=8"]
        two = ["data.max_tokens_per_batch=null", "training.batch_size=2", "training.grad_accum=4"]
        wide = ("_b8", one[:1] + ["training.batch_size=8", "training.grad_accum=2"],
                two[:1] + ["training.batch_size=8", "training.grad_accum=1"])
    runs = {
        "1gpu": (1, None, one), "1gpu_eager": (1, None, one + EAGER),
        "ddp2": (2, "ddp", two), "ddp2_eager": (2, "ddp", two + EAGER),
        "fsdp2": (2, "fsdp", two), "fsdp2_compiled": (2, "fsdp", two + COMPILED),
        "fsdp2_keep": (2, "fsdp", two + KEEP_GATHERED),
        "fsdp2_l1": (2, "fsdp", two + PER_LAYER),
        "fsdp2_compiled_l1": (2, "fsdp", two + COMPILED + PER_LAYER),
        "fsdp2_compiled_rt": (2, "fsdp", two + COMPILED + REPLICATE_TOWERS),
        "fsdp2_compiled_keep": (2, "fsdp", two + COMPILED + KEEP_GATHERED),
        "fsdp2_compiled_fast": (2, "fsdp", two + COMPILED + FAST),
        "lora16_1gpu": (1, None, one + LORA16), "lora16_fsdp2": (2, "fsdp", two + LORA16),
        "lora16_fsdp2_vb": (2, "fsdp", two + LORA16 + TOWER_BLOCKS),
    }
    suffix, wide_one, wide_two = wide
    runs.update({k + suffix: (n, st, [o for o in ov if o not in one + two] + (wide_two if n == 2 else wide_one))
                 for k, (n, st, ov) in list(runs.items())})
    runs.update({"full_1gpu": (1, None, one + FULL), "full_fsdp2": (2, "fsdp", two + FULL),
                 "full8_1gpu": (1, None, one + FULL8), "full8_fsdp2": (2, "fsdp", two + FULL8)})
    runs["resume_fsdp2_on_1gpu"] = (1, None, one + EAGER)
    runs["resume_1gpu_on_fsdp2"] = (2, "fsdp", two)
    return runs


RESUMES = {"resume_fsdp2_on_1gpu": "run_fsdp2", "resume_1gpu_on_fsdp2": "run_1gpu_eager"}   # row -> run it continues


def run(name: str, runs: dict, model: Path, data: Path, root: Path, args) -> dict:
    from train_e2e import TINY_OVERRIDES, steady

    nproc, strategy, overrides = runs[name]
    resume = name in RESUMES
    out = root / ((RESUMES[name] if resume else f"run_{name}") + (f"_{args.tag}" if args.tag else ""))
    total = args.steps + args.resume_steps if resume else args.steps
    if args.profile:   # two more steps, profiled on every process (left out of the steady rate)
        total += 2
    full = name.startswith("full")
    cmd = [sys.executable, "-m", "vlm", "train", str(FULL_CONFIG if full else CONFIG), f"model.path={model}",
           f"data.train=[{data}]", f"output={out}", f"training.max_steps={total}",
           f"training.save_steps={args.steps}", "logging.tensorboard=false", "logging.progress=false",
           "training.logging_steps=1", *(TINY_OVERRIDES if args.tiny else []), *overrides, *args.extra]
    if args.tiny and full:
        cmd += TINY_FULL
    elif args.tiny:   # the shipped config's 8-bit optimizer (train_e2e's tiny rows use adamw): ShardLocal under FSDP
        cmd.append("training.optimizer=adamw_8bit")
    if args.profile:
        cmd.append(f"logging.profile_steps=[{total - 1},{total}]")
    if strategy:
        cmd += [f"distributed.strategy={strategy}", "--nproc", str(nproc)]
    if resume:
        cmd += ["--resume"]
    elif out.exists():
        shutil.rmtree(out)
    if args.spy:   # host-side sampling of every process of the row (py-spy, carried as a wheel)
        cmd = ["py-spy", "record", "--subprocesses", "--nonblocking", "--rate", "50", "--format", "raw",
               "--output", str(root / f"{out.name}.spy.txt"), "--", *cmd]
    env = dict(os.environ)
    if args.tiny:
        env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    row = {"run": name + (f"_{args.tag}" if args.tag else ""), "tag": args.tag, "gpus": nproc,
           "strategy": strategy or "single", "returncode": r.returncode,
           "wall_seconds": round(wall, 1), "command": " ".join(cmd[1:]),
           "quant": "bf16" if "quant=bf16" in overrides else ("none" if args.tiny else "dynamic"),
           "method": "full" if full else "lora",
           "per_gpu_batch": _per_gpu_batch(overrides, args.batching)}
    if r.returncode != 0:
        row["error_tail"] = (r.stdout[-1500:] + "\n" + r.stderr[-3000:]).strip()
        return row
    s = json.loads((out / "summary.json").read_text())
    per = s.get("peak_memory_bytes_per_process") or [s["peak_memory_bytes"]]
    load = s.get("load_peak_memory_bytes_per_process") or []
    params = s.get("parameter_bytes_per_process") or []
    budget = (s.get("data") or {}).get("token_budget") or {}
    row.update(steps=s["steps"], tokens=s["tokens"], train_seconds=s["train_seconds"],
               tokens_per_s=s["tokens_per_s"], tokens_per_s_steady=s.get("tokens_per_s_steady"),
               peak_mem_gib_per_gpu=[round(b / GiB, 2) for b in per],
               load_peak_mem_gib_per_gpu=[round(b / GiB, 2) for b in load],
               param_gib_per_gpu=[round(b / GiB, 2) for b in params], param_bytes_per_gpu=params,
               fsdp_root_unit_gib=round((s.get("sharding") or {}).get("root_unit_bytes_whole", 0) / GiB, 3),
               data_wait_share=steady(s, 2, 2 if args.profile else 0).get("data_wait_share"),
               padding_fraction=s.get("padding_fraction"),
               packed=budget.get("packed"), startup_s=(s.get("startup_seconds") or {}).get("to_first_step_s"),
               final_loss=s["final_loss"], loss_history=s.get("loss_history"),
               resumed_from=s.get("resumed_from"), compiled=bool(s.get("compiled_layers")),
               optimizer=s["config"]["training"]["optimizer"],
               bytes_per_trained_parameter=(s.get("bytes_per_trained_parameter") or {}).get("total"),
               global_batch=s["config"]["training"]["batch_size"] * s["config"]["training"]["grad_accum"] * nproc,
               fsdp_layout=(s.get("sharding") or {}).get("layout"),
               fsdp_unit_classes=(s.get("sharding") or {}).get("unit_classes"),
               training_peak_phase=s.get("training_peak_phase"),   # rank 0's (vlm.train.peak_phase)
               recompiles_after_step_1=[k for k in s.get("compile_steps") or [] if k > 1])
    if args.profile:
        row["profiles"] = _profiles(out, root, row["run"])
    return row


def _profiles(out: Path, root: Path, run: str) -> dict:
    """Each process's profile of the last two steps, copied to ROOT/<run>.profile[_rankR].txt, and the
    first line of each (wall, device kernel time, collectives), printed."""
    found = {}
    for src in sorted(out.glob("profile*.txt")):
        dest = root / f"{run}.{src.name}"
        shutil.copyfile(src, dest)
        first = src.read_text().split("\n", 1)[0]
        found[str(dest)] = first
        print(f"  {dest}: {first}")
    return found


def _per_gpu_batch(overrides: list[str], batching: str) -> str:
    n = next((o.split("=")[1] for o in overrides if o.startswith("training.batch_size=")), "1")
    return f"{n} row(s)" if batching == "tokens" else f"{n} samples"


def write(rows: list[dict], env: dict, results: Path, stem: str) -> Path:
    """Merge ``rows`` into the results JSON (rows of other invocations kept) and write the table."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{stem}.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    names = {r["run"] for r in rows}
    rows = [r for r in saved.get("rows", []) if r["run"] not in names] + rows   # rows of other invocations kept
    # which invocation measured each row: a table joined from several says so, row by row
    env = {**env, "invocations": {**saved.get("env", {}).get("invocations", {}), **env.get("invocations", {})}}
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")

    def key(r):   # rows compare with the 1-GPU row of the same compile setting, quant and per-GPU batch
        return (r["compiled"], r["quant"], r["per_gpu_batch"], r.get("tag", ""), r.get("method", "lora"),
                r.get("optimizer"))

    # the 1-GPU row of the same invocation when there is one, else the latest of another
    singles = [r for r in rows if r.get("gpus") == 1 and r.get("tokens_per_s_steady") and not r.get("skipped")
               and not r["run"].startswith("resume_")]
    base = {key(r): r for r in singles}

    def reference(r):
        same = [b for b in singles if key(b) == key(r) and b.get("invocation") == r.get("invocation")]
        return same[-1] if same else base.get(key(r))

    used = [r.get("invocation") for r in rows if not r.get("skipped")]
    several = len(set(used)) > 1
    lines = [f"# Multi-GPU training, Qwen2-VL-{env.get('model', '7b').upper()} shapes (random weights) — {env['gpu']}", "",
             f"configs/{env.get('config', 'qwen2_vl_7b_qlora.yaml')}, batching: {env['batching']}; data: {env['data']}; torch {env['torch']}, "
             f"transformers {env['transformers']}, accelerate {env['accelerate']}. "
             "Steady tokens/s: summary.json's tokens_per_s_steady (from the last step that compiled in any "
             "process, step 2 at the earliest, to the last step), all GPUs. full* rows: "
             f"configs/{FULL_CONFIG.name} (method full, bf16 weights + BF16AdamW); bytes / trained param: "
             "weight + grad + optimizer state per element of each GPU's shards.", "",
             "| run | GPUs | per-GPU batch | quant | compiled | steady tokens/s | × 1 GPU | params / GPU (GiB) "
             "| load peak / GPU (GiB) | training peak / GPU (GiB) | × 1 GPU | data wait | steps | final loss "
             "| bytes / trained param | invocation |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    if several:
        lines[2:2] = ["**Rows from several invocations** (column `invocation`): a ratio across invocations compares "
                      "runs made at different times; " + "; ".join(f"`{i}`: {env['invocations'].get(i, 'not recorded')}"
                                                                   for i in dict.fromkeys(used)) + ".", ""]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['run']} | {r['gpus']} | | | | not run: {r['skipped']} | | | | | | | | | | |")
            continue
        if r["returncode"] != 0:
            lines.append(f"| {r['run']} | {r['gpus']} | | {r.get('quant', '')} | | failed (rc {r['returncode']}): "
                         f"{_last_error(r)} | | | | | | | | | | {r.get('invocation') or ''} |")
            continue
        ref = reference(r)
        speed = (f"{r['tokens_per_s_steady'] / ref['tokens_per_s_steady']:.2f}"
                 if ref and r.get("tokens_per_s_steady") and r is not ref else "")
        mem = f"{max(r['peak_mem_gib_per_gpu']) / max(ref['peak_mem_gib_per_gpu']):.2f}" if ref and r is not ref else ""
        steady = f"{r['tokens_per_s_steady']:.0f}" if r.get("tokens_per_s_steady") else "n/a"
        wait = f"{r['data_wait_share']:.1%}" if r.get("data_wait_share") is not None else ""
        lines.append(f"| {r['run']} | {r['gpus']} | {r['per_gpu_batch']} | {r['quant']} | "
                     f"{'yes' if r['compiled'] else 'no'} | {steady} | {speed} | "
                     f"{', '.join(map(str, r.get('param_gib_per_gpu') or []))} | "
                     f"{', '.join(map(str, r['load_peak_mem_gib_per_gpu']))} | "
                     f"{', '.join(map(str, r['peak_mem_gib_per_gpu']))} | {mem} | {wait} | {r['steps']} | "
                     f"{r['final_loss']:.4f} | {r.get('bytes_per_trained_parameter') or ''} | "
                     f"{r.get('invocation') or 'not recorded'} |")
    phases = [r for r in rows if r.get("training_peak_phase")]
    if phases:   # which moment of the step holds the peak decides which FSDP knob can lower it
        lines += ["", "Training peak reached in (rank 0, vlm.train.peak_phase):", ""]
        lines += [f"- {r['run']}: {r['training_peak_phase']['phase']} "
                  f"({r['training_peak_phase']['bytes'] / GiB:.2f} GiB)" for r in phases]
    curves = {r["run"]: dict(r["loss_history"]) for r in rows if r.get("loss_history")}
    if len(curves) > 1:
        lines += ["", "Loss per optimizer step (same global batch, same data order):", "",
                  "| step | " + " | ".join(curves) + " |", "| --- |" + " --- |" * len(curves)]
        for step in sorted({s for c in curves.values() for s in c}):
            lines.append(f"| {step} | " + " | ".join(f"{c[step]:.4f}" if step in c else "" for c in curves.values())
                         + " |")
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def _git_rev() -> str:
    """The measured code's commit (with ``+dirty`` for uncommitted changes), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+dirty" if dirty else "")) if rev else "unknown"


def _last_error(r: dict) -> str:
    lines = [ln for ln in r.get("error_tail", "").splitlines() if ln.startswith("error:")]
    return (lines[-1] if lines else "see the JSON").replace("|", "/")[:200]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="7b", choices=sorted(CONFIGS),
                    help="Qwen2-VL shapes and the shipped config they run (2b fits one device call)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--resume-steps", type=int, default=4)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--runs", default="1gpu_eager,fsdp2,1gpu,ddp2")
    ap.add_argument("--batching", default="tokens", choices=("tokens", "samples"))
    ap.add_argument("--root", default="/tmp/vlm_multi_gpu")
    ap.add_argument("--tiny", action="store_true", help="the zoo's tiny Qwen2-VL and small images (CPU smoke run)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every row (e.g. kernels=false)")
    ap.add_argument("--tag", default="", help="suffix for the row names of this invocation (rows with --extra)")
    ap.add_argument("--profile", action="store_true",
                    help="every row runs 2 more steps under torch.profiler on every process (left out of the "
                         "steady rate): ROOT/<run>.profile.txt, .profile_rank1.txt (operators by device and host "
                         "time, host reads of device values, first line: wall vs kernel time)")
    ap.add_argument("--spy", action="store_true",
                    help="sample every process's Python stacks with py-spy into ROOT/<run>.spy.txt (host-bound rows)")
    args = ap.parse_args(argv)
    if args.tiny != (args.device == "cpu"):
        ap.error("--tiny goes with --device cpu (2 gloo processes stand for the 2 GPUs)")
    runs = _runs(args.batching)
    for name in args.runs.split(","):
        if name not in runs:
            ap.error(f"unknown run {name!r}; choose from {', '.join(runs)}")

    import accelerate
    import torch
    import transformers

    from train_e2e import build_checkpoint, prepare_data

    n_gpu = 2 if args.tiny else torch.cuda.device_count()
    if n_gpu < 1:
        print("multi_gpu.py needs CUDA GPUs (or --tiny --device cpu)")
        return 2
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    global CONFIG
    CONFIG = CONFIGS[args.model]
    model = build_checkpoint(root, args.model, args.tiny)
    data = prepare_data(root, argparse.Namespace(samples=min(args.samples, 48) if args.tiny else args.samples,
                                                 tiny=args.tiny))
    env = {"gpu": "tiny" if args.tiny else torch.cuda.get_device_name(0), "gpus_visible": n_gpu,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "python": platform.python_version(), "steps": args.steps,
           "batching": "packed rows of the config's token budget" if args.batching == "tokens" else "sample counts",
           "model": args.model, "config": CONFIG.name,
           "data": f"synthetic_mixed, {args.samples if not args.tiny else min(args.samples, 48)} samples"}
    stem = (("multi_gpu_packed_" if args.batching == "tokens" else "multi_gpu_") + ("2b_" if args.model == "2b" else "")
            + env["gpu"].replace(" ", "_"))
    results = root if args.tiny else REPO / "benchmarks" / "results"
    invocation = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {_git_rev()}"
    env["invocations"] = {invocation: "multi_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = []
    for name in args.runs.split(","):
        if runs[name][0] > n_gpu:
            rows.append({"run": name, "gpus": runs[name][0], "returncode": None, "invocation": invocation,
                         "skipped": f"needs {runs[name][0]} GPUs, {n_gpu} visible"})
            print(f"{name}: skipped ({n_gpu} GPU)")
            continue
        print(f"{name}: running ...", flush=True)
        rows.append({**run(name, runs, model, data, root, args), "invocation": invocation})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("error_tail", "loss_history")}), flush=True)
        if rows[-1].get("error_tail"):
            print(rows[-1]["error_tail"])
        write(rows, env, results, stem)   # after every row: a run cut short by a time limit keeps what it measured
    return 0 if all(r.get("returncode") in (0, None) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
