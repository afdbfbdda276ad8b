"""torch's Adam/AdamW stepped on FSDP2's local shards: the same update, without DTensor dispatch.

Why: under FSDP2 every parameter, gradient and moment is a ``DTensor`` (this process's rows,
``Shard(0)``). torch's foreach AdamW on DTensors runs each of its ~10 foreach ops through DTensor's
sharding propagation over the whole list (a LoRA of Qwen2-VL-2B: 392 tensors). That is host time
only — AdamW is elementwise, no element needs another process's — and an eager LoRA step is
host-bound (2 gloo processes, 392 LoRA-shaped tensors: 92 ms per step on DTensors vs 37 ms plain).

How: ``step`` hands the optimizer each DTensor parameter's local shard (``p._local_tensor``, the
same storage) with its local gradient, and each state entry's local shard; torch's step updates
them in place, so the DTensor parameters and moments hold the result. States created by the first
step are wrapped back as DTensors placed like their parameter, so ``state_dict`` is what it would
be without this class (DCP checkpoints reshard N -> M as before). Per element the update is torch's
own: m ← β₁m + (1-β₁)g, v ← β₂v + (1-β₂)g², p ← p·(1-ηλ) - η·m̂/(√v̂ + ε).
"""

from __future__ import annotations

import torch


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


class LocalShardStepMixin:
    """Put before an elementwise ``torch.optim.Optimizer`` subclass (Adam, AdamW)."""

    @torch.no_grad()
    def step(self, closure=None):
        DTensor = _dtensor()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        swapped, locals_of = [], []
        for group in self.param_groups:
            params = group["params"]
            if not any(isinstance(p, DTensor) for p in params):
                continue
            view = []
            for p in params:
                if not isinstance(p, DTensor):
                    view.append(p)
                    continue
                local = p._local_tensor
                local.grad = None if p.grad is None else p.grad._local_tensor
                self.state[local] = {k: v._local_tensor if isinstance(v, DTensor) else v
                                     for k, v in self.state.get(p, {}).items()}
                view.append(local)
                locals_of.append((p, local))
            swapped.append((group, params))
            group["params"] = view
        try:
            super().step()
        finally:
            for group, params in swapped:
                group["params"] = params
            for p, local in locals_of:
                state = self.state[p]
                for k, v in self.state.pop(local, {}).items():
                    if k not in state:   # created by this step; others were updated in place
                        state[k] = (DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape,
                                                       stride=p.stride(), run_check=False)
                                    if isinstance(v, torch.Tensor) and v.shape == local.shape and v.ndim
                                    else v)
                local.grad = None
        return loss


ELEMENTWISE = (torch.optim.AdamW, torch.optim.Adam)


def local_shard_step(optimizer_cls: type) -> type | None:
    """``optimizer_cls`` stepping FSDP2's local shards, or None when it is not one of torch's
    elementwise optimizers (``ELEMENTWISE``) this applies to."""
    if not (isinstance(optimizer_cls, type) and optimizer_cls in ELEMENTWISE):
        return None
    return type(f"LocalShard{optimizer_cls.__name__}", (LocalShardStepMixin, optimizer_cls), {})


def clip_grad_norm_local(parameters, max_norm: float, norm_type: float = 2.0, fallback=None):
    """``torch.nn.utils.clip_grad_norm_`` for FSDP2's row-sharded gradients, on the local shards.

    ‖g‖₂ over all gradients = √(Σ_ranks Σ_local g²): each process sums its shards' squares, one
    all-reduce adds them, and every gradient is scaled by min(1, max_norm / (‖g‖ + 1e-6)) in place —
    torch's formula, with one collective and no DTensor dispatch (on DTensors torch's version runs
    each foreach op through sharding propagation: 30 vs 6 ms per step for 392 LoRA tensors on CPU).
    Plain (replicated) gradients count once. Anything else (another norm, gradients on several
    meshes, non-row placements) goes to ``fallback`` (accelerate's own clip). Returns the norm."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    DTensor = _dtensor()
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    meshes = {id(g.device_mesh) for g in sharded}
    rows = all(len(g.placements) == 1 and isinstance(g.placements[0], Shard) for g in sharded)
    if norm_type != 2.0 or len(meshes) > 1 or not rows or not sharded:
        return fallback(params, max_norm, norm_type=norm_type)
    local = [g._local_tensor for g in sharded]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    device = local[0].device

    def squares(ts):
        ts = [t for t in ts if t.numel()]
        if not ts:
            return torch.zeros((), device=device, dtype=torch.float32)
        return torch.stack([n.float() for n in torch._foreach_norm(ts)]).square().sum()

    total_sq = squares(local)
    dist.all_reduce(total_sq, group=sharded[0].device_mesh.get_group())
    total = (total_sq + squares(plain).to(device)).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for ts in (local, plain):
        if ts:
            torch._foreach_mul_(ts, coef.to(ts[0].device))
    return total
