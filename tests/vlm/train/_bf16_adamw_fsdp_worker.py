"""Worker for test_bf16_adamw_fsdp.py: 2 gloo processes, FSDP2 on CPU, BF16AdamW on the shards.
``python _bf16_adamw_fsdp_worker.py OUT``; writes rank 0's results (whole tensors) to OUT."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.multiprocessing as mp

STEPS, SPLIT = 6, 3
# (rounding, state_dtype) — 8-bit: the 256 × 32 weight (8,192 elements, 4,096 per shard: whole
# 256-value blocks) gets 8-bit moments; the smaller ones keep bf16 moments (< 4,096 elements)
SETTINGS = [("stochastic", None), ("kahan", None), ("stochastic", "8bit")]


def model():
    """67 rows: shards of 34 and 33 rows (uneven, FSDP2 pads the last); bias/LayerNorm: fp32 masters."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 67), torch.nn.LayerNorm(67), torch.nn.Linear(67, 32, bias=False),
                               torch.nn.Linear(32, 256, bias=False)).to(torch.bfloat16)


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 32, generator=g).to(torch.bfloat16) for _ in range(STEPS)]


def optimizer(params, rounding, state_dtype):
    from vlm.train.bf16_adamw import BF16AdamW

    return BF16AdamW(params, lr=3e-3, weight_decay=0.01, rounding=rounding, seed=7,
                     **({"state_dtype": state_dtype} if state_dtype else {}))


def run(m, opt, xs):
    for x in xs:
        m(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whole(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _worker(rank, port, out, one_process_states):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    try:
        xs = batches()      # every process the same batch: the averaged gradient is one process's
        for rounding, state_dtype in SETTINGS:
            key = f"{rounding}/{state_dtype}"
            # uninterrupted, sharded
            a = model()
            fully_shard(a)
            opt_a = optimizer(a.parameters(), rounding, state_dtype)
            run(a, opt_a, xs)
            local_bytes = sum(t.numel() * t.element_size() for s in opt_a.state.values() for t in s.values()
                              if isinstance(t, torch.Tensor) and t.dim())
            # interrupted after SPLIT steps: the checkpoint form into a fresh optimizer, then the rest
            b = model()
            fully_shard(b)
            opt_b = optimizer(b.parameters(), rounding, state_dtype)
            run(b, opt_b, xs[:SPLIT])
            sd = opt_b.state_dict()
            kinds = sorted({type(v).__name__ for s in sd["state"].values() for v in s.values()
                            if isinstance(v, torch.Tensor) and v.dim()})
            whole_states = {i: {k: _whole(v).clone() for k, v in s.items()} for i, s in sd["state"].items()}
            opt_c = optimizer(b.parameters(), rounding, state_dtype)
            opt_c.load_state_dict(sd)
            run(b, opt_c, xs[SPLIT:])
            # a one-process checkpoint (8-bit codes in 256-blocks of the whole tensor) onto the shards
            d = model()
            fully_shard(d)
            with torch.no_grad():
                for p, w in zip(d.parameters(), one_process_states[key]["weights"]):
                    p._local_tensor.copy_(w.view(-1)[_offset(p):_offset(p) + p._local_tensor.numel()]
                                          .view(p._local_tensor.shape))
            opt_d = optimizer(d.parameters(), rounding, state_dtype)
            opt_d.load_state_dict(one_process_states[key]["state_dict"])
            run(d, opt_d, xs[SPLIT:])
            results[key] = {"weights": [_whole(p).detach().clone() for p in a.parameters()],
                            "resumed": [_whole(p).detach().clone() for p in b.parameters()],
                            "from_one_process": [_whole(p).detach().clone() for p in d.parameters()],
                            "states": whole_states, "state_kinds": kinds, "local_state_bytes": local_bytes}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _offset(p):
    from vlm.train.bf16_adamw import shard_offset

    return shard_offset(p)


def one_process(rounding, state_dtype, steps):
    """The same run in one process (no FSDP): weights, optimizer, and its state_dict."""
    m = model()
    opt = optimizer(m.parameters(), rounding, state_dtype)
    run(m, opt, batches()[:steps])
    return m, opt


if __name__ == "__main__":
    out = sys.argv[1]
    states = {}
    for rounding, state_dtype in SETTINGS:
        m, opt = one_process(rounding, state_dtype, SPLIT)
        states[f"{rounding}/{state_dtype}"] = {"weights": [p.detach().clone() for p in m.parameters()],
                                               "state_dict": opt.state_dict()}
    mp.spawn(_worker, args=(_free_port(), out, states), nprocs=2)
