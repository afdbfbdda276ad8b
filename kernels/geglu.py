"""GeGLU with the tanh approximation of GELU: y = gelu_tanh(g) · u, forward and backward in Triton
(elementwise, fp32 math). Gemma's MLPs use it (``hidden_activation="gelu_pytorch_tanh"``).

Math (a = √(2/π), b = 0.044715):

    inner  k  = a · (g + b·g³)              t = tanh(k)
    gelu      φ = ½ · g · (1 + t)
    forward   y  = φ · u
    backward  du = dy · φ
              dg = dy · u · (½ · (1 + t) + ½ · g · (1 − t²) · a · (1 + 3·b·g²))

Bytes: forward reads g, u and writes y (3 tensors); backward reads dy, g, u and writes dg, du (5
tensors); the backward recomputes t. tanh is written 2σ(2k) − 1, exact in fp32.
The MLP wrapper computes down(geglu(gate(x), up(x))) (Gemma 3's text MLP).
"""

from __future__ import annotations

import math
from types import MethodType

import torch
import triton
import triton.language as tl

from vlm.kernels._util import check_device, elementwise_launch

_A = math.sqrt(2.0 / math.pi)
_B = 0.044715


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _geglu_fwd_kernel(G, U, Y, n, A: tl.constexpr, B: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(A * (g + B * g * g * g))
    tl.store(Y + offs, (0.5 * g * (1.0 + t) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, G, U, DG, DU, n, A: tl.constexpr, B: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(A * (g + B * g * g * g))
    phi = 0.5 * g * (1.0 + t)
    dphi = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * A * (1.0 + 3.0 * B * g * g)
    tl.store(DU + offs, (dy * phi).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * dphi).to(DG.dtype.element_ty), mask=mask)


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        check_device(g, u)
        if g.shape != u.shape:
            raise ValueError(f"geglu: gate {tuple(g.shape)} and up {tuple(u.shape)} differ")
        g, u = g.contiguous(), u.contiguous()
        y = torch.empty_like(g)
        n = g.numel()
        block, nw = elementwise_launch(n)
        _geglu_fwd_kernel[(triton.cdiv(n, block),)](g, u, y, n, A=_A, B=_B, BLOCK=block, num_warps=nw)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        block, nw = elementwise_launch(n)
        _geglu_bwd_kernel[(triton.cdiv(n, block),)](dy, g, u, dg, du, n, A=_A, B=_B, BLOCK=block,
                                                    num_warps=nw)
        return dg, du


def geglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(g) * u with the Triton kernel (same dtype as the inputs)."""
    return GeGLUFunction.apply(g, u)


def geglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pure torch with fp32 math (torch's tanh GELU), rounded once to the input dtype like the kernel."""
    gf = g.float()
    return (torch.nn.functional.gelu(gf, approximate="tanh") * u.float()).to(g.dtype)


def geglu_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down_proj(gelu_tanh(gate_proj(x)) * up_proj(x)); the projections stay modules (LoRA, NF4)."""
    return mlp.down_proj(geglu(mlp.gate_proj(x), mlp.up_proj(x)))


# --------------------------------------------------------------------------- dispatch

def is_geglu_mlp(mod: torch.nn.Module) -> bool:
    """A gated MLP (gate/up/down projections) whose activation is the tanh GELU."""
    if not all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(mod, "act_fn", None)
    return (type(act).__name__ in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation")
            or (isinstance(act, torch.nn.GELU) and act.approximate == "tanh"))


def patch_geglu_mlps(root: torch.nn.Module, set_forward) -> tuple[int, int]:
    """Route every GeGLU MLP under ``root`` through the kernel; (patched, gated MLPs left alone)."""
    n = other = 0
    for _, mod in list(root.named_modules()):
        if is_geglu_mlp(mod):
            set_forward(mod, MethodType(geglu_mlp_forward, mod))
            mod._vlm_kind = "geglu"
            n += 1
        elif all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
            other += 1
    return n, other
