"""Shared test helpers: relative-norm error vs a float64 reference, devices, per-dtype tolerances."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ‖out − ref‖ / ‖ref‖ against a float64 reference. One rounding of the output to the dtype costs about
# 2^-9 ≈ 2e-3 (bf16) / 2^-12 ≈ 2.4e-4 (fp16) relative; fp32 lands near 1e-7.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values in the kernel's output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype, name: str, factor: float = 1.0):
    err = rel_err(out, ref)
    tol = TOL[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"
