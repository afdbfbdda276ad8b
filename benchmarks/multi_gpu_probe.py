"""What two GPUs of the host give without vlmtune: compute alone vs side by side, and NCCL bandwidth.

    python benchmarks/multi_gpu_probe.py [--seconds 3] [--mib 512]

Explains a multi-GPU row of ``benchmarks/multi_gpu.py`` that does not scale: each GPU's bf16
matmul rate (8192³ GEMMs) with one process alone, then with one process per GPU at the same time
(a host whose GPUs slow each other down, or two processes landing on one GPU, shows here), and
the bus bandwidth of NCCL all-reduce / all-gather / reduce-scatter over all visible GPUs
(``busbw``: nccl-tests' definition, bytes moved per rank per second, 2(n-1)/n × size / time for
all-reduce, (n-1)/n × size / time for the other two). Prints one JSON line per measurement and
``nvidia-smi topo -m``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def matmul_tflops(device: int, seconds: float) -> float:
    torch.cuda.set_device(device)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        n += 10
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


def _side_by_side(rank: int, world: int, seconds: float, barrier, out):
    barrier.wait()
    out[rank] = matmul_tflops(rank, seconds)


def _collectives(rank: int, world: int, mib: int, port: str, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    numel = mib * 2**20 // 2
    x = torch.ones(numel, device="cuda", dtype=torch.bfloat16)
    gathered = torch.empty(numel * world, device="cuda", dtype=torch.bfloat16)
    shard = torch.empty(numel // world, device="cuda", dtype=torch.bfloat16)
    ops = {"all_reduce": (lambda: dist.all_reduce(x), 2 * (world - 1) / world),
           "all_gather": (lambda: dist.all_gather_into_tensor(gathered, x), (world - 1) / world * world),
           "reduce_scatter": (lambda: dist.reduce_scatter_tensor(shard, x), (world - 1) / world)}
    for name, (op, factor) in ops.items():
        for _ in range(3):
            op()
        torch.cuda.synchronize()
        t0, reps = time.perf_counter(), 20
        for _ in range(reps):
            op()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / reps
        if rank == 0:
            out[name] = {"ms": round(dt * 1e3, 3), "busbw_GBps": round(factor * x.numel() * 2 / dt / 1e9, 1)}
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--mib", type=int, default=512, help="message size of the collectives")
    args = ap.parse_args(argv)
    n = torch.cuda.device_count()
    print(subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout)
    env = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "CUDA_"))}
    print(json.dumps({"gpus": n, "names": [torch.cuda.get_device_name(i) for i in range(n)], "env": env}))
    for i in range(n):
        print(json.dumps({"alone": i, "tflops": round(matmul_tflops(i, args.seconds), 1)}), flush=True)
    if n < 2:
        return 0
    ctx = mp.get_context("spawn")
    with ctx.Manager() as m:
        out, barrier = m.dict(), m.Barrier(n)
        procs = [ctx.Process(target=_side_by_side, args=(r, n, args.seconds, barrier, out)) for r in range(n)]
        [p.start() for p in procs]
        [p.join() for p in procs]
        print(json.dumps({"side_by_side_tflops": {k: round(v, 1) for k, v in sorted(out.items())}}), flush=True)
        out = m.dict()
        port = str(29500 + os.getpid() % 1000)
        procs = [ctx.Process(target=_collectives, args=(r, n, args.mib, port, out)) for r in range(n)]
        [p.start() for p in procs]
        [p.join() for p in procs]
        print(json.dumps({"nccl": dict(out), "mib": args.mib, "ranks": n}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
