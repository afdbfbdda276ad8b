"""bitsandbytes' 8-bit optimizers on FSDP2's sharded parameters.

Why: under FSDP2 every parameter is a ``DTensor`` (this process's rows of the weight, ``Shard(0)``),
and bitsandbytes' update kernels take plain tensors: ``AdamW8bit.step`` fails with "got mixed
torch.Tensor and DTensor". Adam is elementwise, so the update of a shard needs only that shard's
gradient and moments: run bitsandbytes' own ``init_state`` / ``update_step`` on the *local* tensors
(``p._local_tensor``, ``p.grad._local_tensor``: the same storage, no copy) and keep the 8-bit
moments of the local rows. Memory per process = 2 bytes per local element + one fp32 absmax per
256 local elements, i.e. the 8-bit saving *and* FSDP's 1/N on top of it.

Checkpoints must be portable across process counts (``--resume`` from N to M processes), and the
8-bit blocks are cut per local shard, so they cannot be resharded as they are. ``state_dict`` hands
out the moments dequantized to fp32, as DTensors placed like their parameter (``exp_avg``,
``exp_avg_sq``; DCP reshards those like any weight); ``load_state_dict`` quantizes them back into
256-value blocks of the new local shard. Outside FSDP (plain tensors) every method is bitsandbytes'
own, unchanged.
"""

from __future__ import annotations

import contextlib

import torch

BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state: one absmax per 256 values


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class ShardLocalMixin:
    """Put before a bitsandbytes ``Optimizer2State`` subclass: see the module docstring."""

    @contextlib.contextmanager
    def _local(self, p):
        """``p``'s local shard as the parameter bitsandbytes sees, with ``p``'s state."""
        if not _is_dtensor(p):
            yield p
            return
        local = p._local_tensor
        local.grad = None if p.grad is None else p.grad._local_tensor
        state = self.state[p]
        self.state[local] = state          # the same dict: bitsandbytes writes into p's state
        try:
            yield local
        finally:
            del self.state[local]
            local.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        """bitsandbytes' step without its ``torch.cuda.synchronize()`` after every parameter.

        bitsandbytes synchronizes the device after each parameter's update because paged optimizer
        states are prefetched asynchronously; non-paged states are plain device tensors, every update
        kernel runs on the current stream, and nothing in the update reads a device value on the host,
        so the per-parameter waits only stall the host (a 7B LoRA: ~400 waits per step). Paged
        optimizers keep bitsandbytes' own step."""
        if self.is_paged:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
        return loss

    @torch.no_grad()
    def init_state(self, group, p, gindex, pindex):
        with self._local(p) as lp:
            super().init_state(group, lp, gindex, pindex)

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        with self._local(p) as lp:
            super().update_step(group, lp, gindex, pindex)

    def prefetch_state(self, p):
        with self._local(p) as lp:
            super().prefetch_state(lp)

    # -- checkpoints: dense moments placed like the parameter ---------------------------------
    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self):
        params = self._params()
        if not any(_is_dtensor(p) for p in params):
            return super().state_dict()
        from torch.distributed.tensor import DTensor

        sd = torch.optim.Optimizer.state_dict(self)   # ids for params, group hyper-parameters
        index = {id(p): i for i, p in enumerate(params)}
        out = {}
        for p, st in self.state.items():
            if id(p) not in index or not st:
                continue
            m, v = _dense_moments(st)
            if _is_dtensor(p):
                m, v = (DTensor.from_local(t.view_as(p._local_tensor), p.device_mesh, p.placements,
                                           run_check=False, shape=p.shape, stride=p.stride())
                        for t in (m, v))
            out[index[id(p)]] = {"step": torch.tensor(float(st["step"])), "exp_avg": m, "exp_avg_sq": v}
        sd["state"] = out
        return sd

    def load_state_dict(self, state_dict, move_to_device=True):
        saved = state_dict.get("state", {})
        if not any(isinstance(s, dict) and "exp_avg" in s for s in saved.values()):
            return super().load_state_dict(state_dict, move_to_device=move_to_device)
        params = self._params()
        groups = state_dict["param_groups"]
        for g, sg in zip(self.param_groups, groups):
            g.update({k: v for k, v in sg.items() if k != "params"})
        order = [i for sg in groups for i in sg["params"]]
        self.state.clear()
        for saved_id, p in zip(order, params):
            s = saved.get(saved_id)
            if not s:
                continue
            m, v = (t.to_local() if _is_dtensor(t) else t for t in (s["exp_avg"], s["exp_avg_sq"]))
            gindex, pindex = _position(self.param_groups, p)
            with self._local(p) as lp:
                super().init_state(self.param_groups[gindex], lp, gindex, pindex)
                _load_moments(self.state[p], m.to(lp.device).reshape(lp.shape),
                              v.to(lp.device).reshape(lp.shape))
            self.state[p]["step"] = int(float(s["step"]))


def _position(groups, p) -> tuple[int, int]:
    for gi, g in enumerate(groups):
        for pi, q in enumerate(g["params"]):
            if q is p:
                return gi, pi
    raise KeyError("parameter not in the optimizer")


def _dense_moments(st) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 first and second moments from bitsandbytes' state (8-bit blockwise or 32-bit)."""
    import bitsandbytes.functional as F

    s1, s2 = st["state1"], st["state2"]
    if s1.dtype != torch.uint8:
        return s1.float().clone(), s2.float().clone()
    m = F.dequantize_blockwise(s1, absmax=st["absmax1"], code=st["qmap1"], blocksize=BLOCK)
    v = F.dequantize_blockwise(s2, absmax=st["absmax2"], code=st["qmap2"], blocksize=BLOCK)
    return m.float(), v.float()


def _load_moments(st, m: torch.Tensor, v: torch.Tensor) -> None:
    """Write dense moments into a freshly initialised state, quantizing where it is 8-bit.

    Re-quantizing is not bit-exact: a block's absmax is not always recoverable from its
    dequantized values (the signed map's most negative code is -0.993, not -1), so a moment can move
    by up to 0.7 % of its block's absmax — within the 8-bit state's own resolution."""
    import bitsandbytes.functional as F

    if st["state1"].dtype != torch.uint8:
        st["state1"].copy_(m)
        st["state2"].copy_(v)
        return
    for key, dense in (("1", m), ("2", v)):
        q, qs = F.quantize_blockwise(dense.float().contiguous(), code=st["qmap" + key], blocksize=BLOCK)
        st["state" + key].copy_(q.view_as(st["state" + key]))
        st["absmax" + key].copy_(qs.absmax)


def shard_local(optimizer_cls: type) -> type:
    """``optimizer_cls`` (a bitsandbytes 8-bit/32-bit ``Optimizer2State``) made FSDP2-aware."""
    return type(f"ShardLocal{optimizer_cls.__name__}", (ShardLocalMixin, optimizer_cls), {})


def is_bitsandbytes_optimizer(optimizer_cls: type) -> bool:
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return False
    return isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer8bit)
