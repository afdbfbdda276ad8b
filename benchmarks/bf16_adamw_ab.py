"""BF16AdamW's step now vs at an earlier commit, side by side in one process (interleaved steps, so
machine load hits both alike): the optimizer's own cost on realistic parameter sets.

    python benchmarks/bf16_adamw_ab.py --base 8ff4cf1 --params 47 --device cpu    # Qwen2-VL-like layers
    python benchmarks/bf16_adamw_ab.py --base 8ff4cf1 --shapes tiny               # the tiny model's set
    python benchmarks/bf16_adamw_ab.py --base 8ff4cf1 --device cuda --params 1500  # GPU (compiled path)

The earlier version is read with ``git show BASE:vlm/train/bf16_adamw.py`` and imported beside the
current one; both step the same random bf16 weights and gradients. ``--profile`` adds torch.profiler's
top ops of one step of each. Prints min and median seconds per step and ns per parameter.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# one Qwen2-VL-2B decoder layer's tensors (hidden 1536, kv 256, intermediate 8960) and its norms
LAYER = [(1536, 1536), (256, 1536), (256, 1536), (1536, 1536), (8960, 1536), (8960, 1536), (1536, 8960),
         (1536,), (1536,), (256,), (256,), (1536,)]
TINY = [(151936, 64)] + [(64, 64), (128, 64), (64, 128), (64,)] * 8     # the tiny Qwen2-VL's embedding dominates


def load_base(commit: str):
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:vlm/train/bf16_adamw.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "bf16_adamw_base.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("bf16_adamw_base", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shapes_for(args) -> list[tuple]:
    if args.shapes == "tiny":
        return TINY
    out, n = [], 0
    while n < args.params * 1e6:
        for s in LAYER:
            out.append(s)
            n += 1 if not s else __import__("math").prod(s)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git commit of the earlier version")
    ap.add_argument("--params", type=float, default=47.0, help="millions of parameters (layer shapes)")
    ap.add_argument("--shapes", choices=("layers", "tiny"), default="layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    import vlm.train.bf16_adamw as current

    versions = {"base " + args.base: load_base(args.base), "current": current}
    shapes = shapes_for(args)
    total = sum(torch.Size(s).numel() for s in shapes)

    def make():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(args.device, torch.bfloat16)) for s in shapes]
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(args.device, torch.bfloat16)
        return ps

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    opts = {k: m.BF16AdamW(make(), lr=1e-5) for k, m in versions.items()}
    for o in opts.values():          # state init and (GPU) compile
        o.step()
        o.step()
    times = {k: [] for k in opts}
    for _ in range(args.steps):
        for k, o in opts.items():
            sync()
            t = time.perf_counter()
            o.step()
            sync()
            times[k].append(time.perf_counter() - t)
    print(f"{len(shapes)} tensors, {total / 1e6:.1f} M bf16 parameters, {args.device}, {args.steps} interleaved steps")
    for k, ts in times.items():
        print(f"  {k:>20}: min {min(ts):.4f} s, median {statistics.median(ts):.4f} s per step "
              f"({min(ts) / total * 1e9:.1f} ns/param)")
    first, last = (min(ts) for ts in times.values())
    print(f"  current / base speed: {first / last:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        for k, o in opts.items():
            with profile(activities=acts) as prof:
                o.step()
                sync()
            print(f"--- {k}\n" + prof.key_averages().table(
                sort_by="cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
