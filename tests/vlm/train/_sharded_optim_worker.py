"""Worker for test_sharded_optim.py: 2 gloo processes, FSDP2 on CPU (run as a script so that
multiprocessing's spawn can re-import it). ``python _sharded_optim_worker.py OUT wrap|plain``."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.multiprocessing as mp

ROWS, COLS = 256, 64   # weights only (no bias): each shard holds 128 or 32 whole rows = whole 256-value blocks


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(COLS, ROWS, bias=False), torch.nn.Linear(ROWS, COLS, bias=False))


def _steps(model, opt, n=3):
    x = torch.randn(8, COLS, generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out, wrap):
    import bitsandbytes as bnb
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from vlm.train.sharded_optim import shard_local

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        fully_shard(model)
        cls = shard_local(bnb.optim.AdamW8bit) if wrap else bnb.optim.AdamW8bit
        opt = cls(model.parameters(), lr=1e-2, min_8bit_size=0)
        try:
            _steps(model, opt)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            if rank == 0:
                torch.save({"error": f"{type(e).__name__}: {e}"}, out)
            return
        weights = [p.full_tensor() for p in model.parameters()]
        sd = opt.state_dict()
        moments = {i: (s["exp_avg"].full_tensor(), s["exp_avg_sq"].full_tensor(), int(s["step"]))
                   for i, s in sd["state"].items()}
        # load the checkpoint form into a fresh optimizer: the moments come back within the 8-bit
        # state's resolution (largest change relative to the largest moment of the shard)
        from vlm.train.sharded_optim import _dense_moments

        fresh = cls(model.parameters(), lr=1e-2, min_8bit_size=0)
        fresh.load_state_dict(sd)
        same = max(float((a - b).abs().max() / b.abs().max())
                   for p in model.parameters()
                   for a, b in zip(_dense_moments(fresh.state[p]), _dense_moments(opt.state[p])))
        if rank == 0:
            torch.save({"weights": weights, "moments": moments, "reload_rel_change": same,
                        "state_kind": type(sd["state"][0]["exp_avg"]).__name__}, out)
    finally:
        dist.destroy_process_group()





if __name__ == "__main__":
    mp.spawn(_worker, args=(_free_port(), sys.argv[1], sys.argv[2] == "wrap"), nprocs=2)
