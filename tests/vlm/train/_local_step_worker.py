"""Worker for test_local_step.py: 2 gloo processes, FSDP2 on CPU (run as a script so that
multiprocessing's spawn can re-import it). ``python _local_step_worker.py OUT``."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Lora(torch.nn.Module):
    """LoRA-like: a frozen base and trainable factors, one with rows not divisible by 2 (uneven shards)."""

    def __init__(self):
        super().__init__()
        self.base, self.a, self.b = (torch.nn.Linear(32, 32), torch.nn.Linear(32, 5, bias=False),
                                     torch.nn.Linear(5, 32, bias=False))
        self.base.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def _model():
    torch.manual_seed(0)
    return _Lora()


def _forward(m, x):
    return m(x).pow(2).mean()


class _CountDTensorOps(TorchDispatchMode):
    """Counts operators called with a DTensor among their arguments (each one goes through DTensor's
    sharding propagation on the host)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(isinstance(t, DTensor) for t in tree_leaves((args, kwargs or {}))):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _clip_both(x):
    """Gradients clipped by torch's clip_grad_norm_ on the DTensors and by clip_grad_norm_local, from
    the same backward: (norm, whole gradients, DTensor ops) for each."""
    from torch.distributed.fsdp import fully_shard

    from vlm.train.local_step import clip_grad_norm_local

    out = {}
    for name in ("torch", "local"):
        model = _model()
        fully_shard(model)
        _forward(model, x * 30).backward()     # large enough that the clip scales
        trained = [p for p in model.parameters() if p.requires_grad]
        with _CountDTensorOps() as count:
            if name == "torch":
                norm = torch.nn.utils.clip_grad_norm_(trained, 0.5, foreach=True).full_tensor()
            else:
                norm = clip_grad_norm_local(trained, 0.5)
        out[name] = (float(norm), [p.grad.full_tensor() for p in trained], count.n)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from vlm.train.local_step import local_shard_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x = torch.randn(6, 32, generator=torch.Generator().manual_seed(1 + rank))
        result = {}
        for name, cls in (("torch", torch.optim.AdamW), ("local", local_shard_step(torch.optim.AdamW))):
            model = _model()
            fully_shard(model)
            trained = [p for p in model.parameters() if p.requires_grad]
            opt = cls(trained, lr=1e-2, weight_decay=0.1, foreach=True)
            ops = []
            for _ in range(3):
                _forward(model, x).backward()
                with _CountDTensorOps() as count:
                    opt.step()
                ops.append(count.n)
                opt.zero_grad()
            sd = opt.state_dict()
            result[name] = {
                "moments": {i: (s["exp_avg"].full_tensor(), s["exp_avg_sq"].full_tensor(), float(s["step"]))
                            for i, s in sd["state"].items()},
                "state_kinds": sorted({type(v).__name__ for s in sd["state"].values()
                                       for k, v in s.items() if k != "step"}),
                "dtensor_ops_per_step": ops,
            }
            # the checkpoint form loads into a fresh optimizer of the same class and steps on
            fresh = cls(trained, lr=1e-2, weight_decay=0.1, foreach=True)
            fresh.load_state_dict(sd)
            _forward(model, x).backward()
            fresh.step()
            result[name]["weights"] = [p.full_tensor() for p in model.parameters()]
        result["clip"] = _clip_both(x)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_worker, args=(_free_port(), sys.argv[1]), nprocs=2)
