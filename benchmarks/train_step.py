"""One LoRA training step on workload W, HF baselines and vlmtune side by side (issue 9).

    python benchmarks/train_step.py                          # GPU: all variants, Qwen2-VL-2B shapes
    python benchmarks/train_step.py --tiny --device cpu      # smoke test of every code path on CPU
    python benchmarks/train_step.py --model qwen2_vl_7b      # W at Qwen2-VL-7B (or llava_1_5_7b) shapes
    python benchmarks/train_step.py --model qwen3_vl_8b      # W at Qwen3-VL-8B shapes: a, d, e (~4 min)

Workload W: Qwen2-VL-2B shapes, random bf16 weights built on the device (seed 0) and saved once;
batch 8 × 512 tokens, each sample = 8 prompt tokens, <|vision_start|>, 256 <|image_pad|>,
<|vision_end|>, 246 answer tokens, one 448×448 image (grid 1×32×32 = 1024 patches → 256 merged
tokens); labels on the 254 text tokens only; LoRA r=16, α=16 on q,k,v,o,gate,up,down of the language
model; vision tower frozen; AdamW (torch, fused) lr 2e-4; bf16 weights under bf16 autocast (what
Trainer(bf16=True) does). Four distinct batches are cycled; every variant sees the same sequence.
``--model`` picks the shapes: qwen2_vl_2b (the default, above), qwen2_vl_7b, qwen2_5_vl_7b (same W),
qwen3_vl_8b (same W around one 512×512 image: 16-px patches), llava_1_5_7b (batch 8 × 832 tokens around
one 336×336 image each: 576 image tokens; train_step_workload.py). Variants by default: all five at
qwen2_vl_2b, a, d, e at the other shapes.

Variants (each in its own subprocess, so memory peaks never mix):
  a        transformers + PEFT, gradient checkpointing (non-reentrant, HF's default),
           enable_input_require_grads() (the usual HF/PEFT recipe)
  b        (a) + bitsandbytes NF4 on the language linears (vision tower, merger, lm_head in 16-bit)
  c        (a) + Liger-Kernel (apply_liger_kernel_to_qwen2_vl: RoPE, RMSNorm, LayerNorm, SwiGLU,
           fused linear CE)
  d        vlmtune 16-bit LoRA, what `vlm train` does on a GPU by default (vlm.train.fast_path):
           vlm.load → vlm.lora.apply_lora(gradient_checkpointing=True) → vlm.vision_attention (one
           SDPA per vision block for equal-size images) → vlm.kernels.patch (fused linear CE, NF4
           linears through vlm::nf4_linear; the layer-level kernels are left to inductor) →
           vlm.train.compile: the frozen vision blocks and each decoder layer compiled, the layer's
           checkpoint inside its compiled graph
  e        vlmtune QLoRA: (d) with vlm.load(quant="dynamic")
Ablations (``--variants`` picks; names and labels in train_step_variants.VARIANTS; flags after the
first "_" combine): d_eager / e_eager = no torch.compile, our Triton RMSNorm/RoPE/SwiGLU/NF4+LoRA
kernels instead; _ro = CUDA graphs (training.cuda_graphs); _mlpN = MLP over N token blocks
(training.mlp_chunks); d_ro_mlp2 / e_ro_mlp2 = both; _evis = the vision tower left eager; d_hfck =
HF's checkpoint around the compiled layer; d_gc2 = checkpoint every 2nd layer; d_novis = HF's
image-by-image vision attention; d_cpp = inductor's C++ wrapper. Ablations of d_eager from the first runs
(they also keep HF's vision attention): d_old = before both fixes (the vision tower in
the autograd graph, as HF's enable_input_require_grads makes it, and PEFT's input cast); d_nokern =
without vlm.kernels.patch; d_nogc = without gradient checkpointing; d_cast = with PEFT's
bf16 → fp32 input cast that autocast undoes (before the cast fix).

MFU (model FLOPs utilisation), the formula used here:
    model FLOPs / step = 4 · N_LM · T  +  2 · N_vis · P
  N_LM  = weights of every matmul in the language model, lm_head included (1.54 G at 2B);
          4 = forward (2) + input-gradient backward (2): the base weights are frozen, so there is no
          weight-gradient matmul; LoRA's own FLOPs (r=16) are < 1 % and not counted.
  T     = tokens per step (8 × 512 = 4,096; image tokens go through the language model too).
  N_vis = vision matmul weights per patch: patch embedding + 32 blocks + the merger / 4 (the merger
          runs once per 2×2 patches); P = patches per step (8 × 1024 = 8,192). Frozen tower: forward
          only (2·).
  Attention score/value FLOPs are not counted (LM ≈ 0.3 TFLOP fwd at 512 tokens, vision ≈ 1.4 TFLOP
  fwd at 1024-patch images; listed in the JSON).
  Recompute: gradient checkpointing of the language layers adds 2 · N_LM(layers) · T (another
  forward); HF's recipe (a/b/c) also recomputes and back-propagates the frozen vision tower
  (+4 · N_vis · P). These are in "hardware FLOPs" (HFU) in the JSON, not in MFU.
  MFU = model FLOPs / step time / peak, peak = the bf16 matmul rate measured in the same invocation
  (8192³, random data); MFU against the 989 TFLOP/s datasheet figure is in the JSON too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_step_report import markdown, targets  # noqa: E402
from train_step_variants import VARIANTS, setup  # noqa: E402
from train_step_workload import (LORA_LEAVES, MODELS, count_flops, default_variants,  # noqa: E402
                                 label_tokens, make_batches, model_config, shapes)

GiB = 2**30


def _importable_vlm() -> None:
    try:
        import vlm  # noqa: F401
    except ImportError:  # uninstalled checkout: link vlm/ only (kernels/ would shadow HF's package)
        import quant_memory  # noqa: F401  (its import does the linking)



# --------------------------------------------------------------------------- build (subprocess)

def build(args) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    cfg = model_config(args.model, args.tiny)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(args.ckpt, max_shard_size="4GB")   # host memory: one shard at a time
    del model
    info = {}
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            x @ y
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            s.record(); x @ y; e.record(); e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        info["matmul_tflops"] = 2 * 8192 ** 3 / statistics.median(times) / 1e12
    return info


# --------------------------------------------------------------------------- one variant (subprocess)

def worker(args) -> dict:
    import torch

    _importable_vlm()
    v = args.worker
    cuda = args.device.startswith("cuda")
    from vlm.load import load_config

    config = load_config(args.ckpt)
    cpu_batches = make_batches(args.model, config, args.tiny)
    batches = [{k: t.to(args.device, non_blocking=True) for k, t in b.items()} for b in cpu_batches]
    t0 = time.perf_counter()
    model, opt, info = setup(v, args, batches)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    ready_s = time.perf_counter() - T_START
    if cuda:
        load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    tokens = int(batches[0]["attention_mask"].sum())
    n_steps = args.warmup + args.steps

    def ev():
        return torch.cuda.Event(enable_timing=True) if cuda else None

    def step(i, timed=True):
        b = batches[i % len(batches)]
        e0, e1, e2, e3 = ev(), ev(), ev(), ev()
        ts = time.perf_counter()
        if cuda:
            e0.record()
        last = i == n_steps - 1
        if cuda and last:   # where the peak is: forward (incl. the loss) or backward
            torch.cuda.synchronize()
            peak_before.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
            loss = model(**b).loss
        if cuda:
            e1.record()
            if last:
                e1.synchronize()
                fwd_peak.append(torch.cuda.max_memory_allocated() / GiB)
        loss.backward()
        if cuda:
            e2.record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            e3.record()
            e3.synchronize()
        wall = time.perf_counter() - ts
        parts = ([e0.elapsed_time(e1), e1.elapsed_time(e2), e2.elapsed_time(e3)] if cuda else [0, 0, 0])
        return float(loss.detach().float()), wall, parts

    losses, walls, parts, fwd_peak, peak_before = [], [], [], [], []
    for i in range(n_steps):
        loss, wall, p = step(i)
        losses.append(loss)
        walls.append(wall)
        parts.append(p)
    timed = walls[args.warmup:]
    med = statistics.median(timed)
    row = {"variant": v, "label": VARIANTS[v], **info, "load_s": load_s, "process_ready_s": ready_s,
           "first_step_s": walls[0], "second_step_s": walls[1] if len(walls) > 1 else None,
           "steps_timed": len(timed), "warmup": args.warmup, "step_s_median": med,
           "step_s_min": min(timed), "step_s_max": max(timed), "tokens_per_step": tokens,
           "tokens_per_s": tokens / med, "first_step_loss": losses[0], "losses": losses,
           "fwd_bwd_opt_ms_median": [statistics.median(p[j] for p in parts[args.warmup:]) for j in range(3)],
           "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
           "host_offload_gib": 0.0}
    if cuda:
        peak_all = max(peak_before + [torch.cuda.max_memory_allocated()])
        row.update(resident_gib=resident / GiB, load_peak_alloc_gib=load_peak / GiB,
                   peak_alloc_gib=peak_all / GiB, last_step_fwd_peak_gib=fwd_peak[0],
                   last_step_peak_gib=torch.cuda.max_memory_allocated() / GiB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB)
    if cuda:
        row["vision_fwd_ms"] = vision_forward_ms(model, batches[0])
    if args.profile and v in args.profile.split(","):
        try:
            row["profile"] = profile(step, n_steps, args, v)
        except Exception as ex:  # noqa: BLE001 - the timings above stand without it
            row["profile_error"] = repr(ex)[:500]
    return row


def vision_forward_ms(model, batch) -> float | None:
    """Median time of the vision tower alone on one batch (no_grad, bf16 autocast), to split the step."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    visual = getattr(getattr(base, "model", base), "visual", None)
    if visual is None:
        return None
    times = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(6):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
    return statistics.median(times[1:])


def profile(step, start, args, v) -> dict:
    """A few steps under torch.profiler: top kernels by GPU time, GPU busy fraction."""
    from torch.profiler import ProfilerActivity, profile as tprof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    n = 3 if not args.tiny else 1
    t = time.perf_counter()
    with tprof(activities=acts) as prof:
        for i in range(n):
            step(start + i)
    wall = (time.perf_counter() - t) / n
    ka = prof.key_averages()
    key = "device_time_total" if args.device.startswith("cuda") else "cpu_time_total"

    def dev_t(e):
        return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or 0

    rows = sorted(ka, key=dev_t, reverse=True)
    # kernels only: an aten op's self device time is its kernels' time again
    kernels = [e for e in ka if str(getattr(e, "device_type", "")).endswith(("CUDA", "PrivateUse1"))]
    busy = sum(dev_t(e) for e in (kernels or ka)) / 1e6 / n
    top = [{"name": e.key[:120], "calls_per_step": e.count / n, "gpu_ms_per_step": dev_t(e) / 1e3 / n}
           for e in rows[:40]]
    table = ka.table(sort_by="self_" + key.replace("_total", "_total"), row_limit=45, max_name_column_width=70)
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{v}.txt").write_text(table)
    return {"steps": n, "wall_s_per_step": wall, "gpu_busy_s_per_step": busy, "top": top}


# --------------------------------------------------------------------------- driver

def run_sub(argv: list[str], timeout: int) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as ex:   # recorded as that variant's error; the others still run
        out = ex.stdout.decode(errors="replace") if isinstance(ex.stdout, bytes) else (ex.stdout or "")
        err = ex.stderr.decode(errors="replace") if isinstance(ex.stderr, bytes) else (ex.stderr or "")
        return {"error": f"timed out after {timeout} s", "tail": (out + err)[-3000:]}
    tail = (p.stdout + p.stderr)[-3000:]
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["subprocess_s"] = time.perf_counter() - t
            return r
    return {"error": f"exit {p.returncode}", "tail": tail}


def env_info(args) -> dict:
    import torch
    import transformers

    e = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "transformers": transformers.__version__}
    for mod in ("peft", "triton", "bitsandbytes", "accelerate"):
        try:
            e[mod] = __import__(mod).__version__
        except Exception as ex:  # noqa: BLE001
            e[mod] = f"missing ({type(ex).__name__})"
    try:
        from importlib.metadata import version

        e["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001
        e["liger_kernel"] = "missing"
    if args.device.startswith("cuda"):
        e["gpu"] = torch.cuda.get_device_name()
        try:
            e["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True).stdout.strip()
        except Exception:  # noqa: BLE001
            e["driver"] = "?"
    else:
        e["gpu"] = "cpu"
    try:
        # "-dirty": the run measured uncommitted changes on top of that commit
        e["git"] = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                                  text=True, cwd=HERE).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return e



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=None, help="default: a,b,c,d,e at qwen2_vl_2b, a,d,e elsewhere")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--model", default="qwen2_vl_2b", choices=MODELS, help="the model shapes of W")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", default="d", help="variants to profile after timing ('' = none)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default=None, help="results file stem (default train_step[_tiny])")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per variant subprocess")
    ap.add_argument("--note", default="")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variants is None:
        args.variants = default_variants(args.model)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.worker or args.build:
        _importable_vlm()
        r = build(args) if args.build else worker(args)
        print("RESULT " + json.dumps(r), flush=True)
        return 0

    _importable_vlm()
    work = Path(tempfile.mkdtemp(prefix="train_step_"))
    ckpt = work / args.model
    common = ["--device", args.device, "--ckpt", str(ckpt), "--out", args.out,
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--profile", args.profile,
              "--model", args.model]
    if args.tiny:
        common.append("--tiny")
    t = time.perf_counter()
    b = run_sub(["--build", *common], args.timeout)
    if "error" in b:
        print("build failed:", b["tail"])
        return 1
    print(f"built checkpoint in {time.perf_counter() - t:.1f}s; matmul {b.get('matmul_tflops', 0):.0f} TFLOP/s",
          flush=True)
    config = model_config(args.model, args.tiny)
    fl = count_flops(args.model, config, args.tiny)
    s = shapes(args.model, args.tiny)
    cfg = {"model": f"{args.model} shapes" if not args.tiny else f"tiny {args.model}", **s,
           "patches": fl["patches"], "label_tokens": label_tokens(args.model, s), "steps": args.steps,
           "warmup": args.warmup, "lora": {"r": 16, "alpha": 16, "targets": LORA_LEAVES},
           "optimizer": "torch.optim.AdamW(lr=2e-4, fused=True)", "autocast": "bf16",
           "note": args.note, "text_config": config.text_config.to_dict(),
           "vision_config": config.vision_config.to_dict()}
    rows = []
    stem = args.name or ("train_step" + ("" if args.model == "qwen2_vl_2b" else f"_{args.model}")
                         + ("_tiny" if args.tiny else ""))
    data = {}
    for v in args.variants.split(","):
        r = run_sub(["--worker", v, *common], args.timeout)
        r.setdefault("variant", v)
        rows.append(r)
        if "error" in r:
            print(f"[{v}] FAILED {r['error']}\n{r['tail']}", flush=True)
        else:
            print(f"[{v}] {r['step_s_median'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, "
                  f"peak {r.get('peak_alloc_gib', 0):.2f} GiB, loss0 {r['first_step_loss']:.6f}, "
                  f"fwd/bwd/opt {['%.0f' % x for x in r['fwd_bwd_opt_ms_median']]} ms, "
                  f"ready {r['process_ready_s']:.1f}s, step0 {r['first_step_s']:.2f}s", flush=True)
        data = {"env": env_info(args), "config": cfg, "flops": fl, "matmul_tflops": b.get("matmul_tflops"),
                "datasheet_tflops": 989.0, "rows": rows,
                "targets": targets(rows, fl, b.get("matmul_tflops"))}
        for dst in {Path(args.out), Path(os.environ.get("OUT", args.out))}:
            dst.mkdir(parents=True, exist_ok=True)
            (dst / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
            (dst / f"{stem}.md").write_text(markdown(data))
    print(markdown(data))
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            print(f"profile {r['variant']}: wall {p['wall_s_per_step'] * 1e3:.0f} ms/step, GPU busy "
                  f"{p['gpu_busy_s_per_step'] * 1e3:.0f} ms/step")
            for x in p["top"][:25]:
                print(f"  {x['gpu_ms_per_step']:8.2f} ms  {x['calls_per_step']:6.0f}×  {x['name'][:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
