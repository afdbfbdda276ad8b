"""Small helpers shared by the kernel files: launch heuristics and interpreter handling.

Under ``TRITON_INTERPRET=1`` (CPU machines) ``@triton.autotune`` fails, so every kernel here picks
its block sizes and warps by heuristics; nothing autotunes.
"""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


def warps_for(block: int) -> int:
    """Warps per program for a row kernel touching ``block`` elements (16-byte loads, 32 lanes)."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    if block >= 1024:
        return 4
    return 2 if block >= 256 else 1


def elementwise_launch(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a 1-D elementwise kernel over ``n`` values (SwiGLU, GeGLU): one
    4096-value block per program on a GPU; under the CPU interpreter one block over everything (up
    to 65,536 values), since each interpreted program costs far more than its arithmetic."""
    if interpreting():
        return max(16, min(triton.next_power_of_2(n), 1 << 16)), 1
    return 4096, 8


def check_device(*tensors: torch.Tensor) -> None:
    """Triton launches need CUDA tensors, or CPU tensors under the interpreter."""
    for t in tensors:
        if t.device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "vlm.kernels: CPU tensors need TRITON_INTERPRET=1 (set before importing triton); "
                "use the *_reference functions for plain CPU execution")
