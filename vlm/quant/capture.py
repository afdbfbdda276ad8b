"""Capture calibration inputs of many linear layers in one forward pass, with bounded memory.

A forward pre-hook on each named linear keeps a random subset of its input rows (the input is
flattened to (tokens, in_features)). Each layer keeps at most ``max_rows`` rows in total, split
evenly over the ``n_batches`` batches: memory is bounded by max_rows × Σ in_features elements in
the model dtype (e.g. 256 rows × ~1.9 M input features ≈ 1 GB for Qwen2-VL-2B in bf16), whatever
the calibration set's size. Row choice uses a seeded generator: reproducible for a seed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


class InputCapture:
    """Collects subsampled inputs ``rows[name] -> (r, in_features)`` tensors."""

    def __init__(self, modules: dict[str, nn.Module], *, max_rows: int, n_batches: int, seed: int):
        self.modules = modules
        self.per_call = max(1, max_rows // max(1, n_batches))
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.count: dict[str, int] = {n: 0 for n in modules}
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if not torch.is_tensor(x):
                return
            x = x.detach().reshape(-1, x.shape[-1])
            room = self.max_rows - self.count[name]
            k = min(self.per_call, room, x.shape[0])
            if k <= 0:
                return
            idx = torch.randperm(x.shape[0], generator=self.gen)[:k].to(x.device)
            self.rows[name].append(x.index_select(0, idx).clone())
            self.count[name] += k
        return hook

    def __enter__(self):
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def inputs(self, name: str) -> torch.Tensor | None:
        """The captured rows of ``name`` (None when the layer never ran on calibration data)."""
        parts = self.rows.get(name) or []
        return torch.cat(parts, 0) if parts else None


def move_batch(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to ``device``; floating tensors (pixel values) to the model dtype."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


@contextmanager
def capture_inputs(model: nn.Module, names: Iterable[str], batches: list[dict], *,
                   max_rows: int = 256, seed: int = 0) -> Iterator[InputCapture]:
    """Run ``model`` once over ``batches`` with hooks on ``names``; yields the InputCapture."""
    modules = dict(model.named_modules())
    wanted = {n: modules[n] for n in names}
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    cap = InputCapture(wanted, max_rows=max_rows, n_batches=len(batches), seed=seed)
    with cap, torch.no_grad():
        for b in batches:
            model(**move_batch(b, device, dtype))
    try:
        yield cap
    finally:
        cap.rows.clear()
