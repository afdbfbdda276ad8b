"""SwiGLU: y = silu(g) · u, forward and backward in Triton (elementwise, fp32 math).

Math (σ = sigmoid):

    forward   y  = g · σ(g) · u
    backward  du = dy · g · σ(g)
              dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))

Bytes: forward reads g, u and writes y (3 tensors); backward reads dy, g, u and writes dg, du
(5 tensors). Nothing else is saved: the backward recomputes σ(g).
The MLP wrapper computes down(swiglu(gate(x), up(x))) (LLaMA/Qwen2/Mistral/Mllama text MLPs).
"""

from __future__ import annotations

from types import MethodType

import torch
import triton
import triton.language as tl

from vlm.kernels._util import check_device, elementwise_launch


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        check_device(g, u)
        if g.shape != u.shape:
            raise ValueError(f"swiglu: gate {tuple(g.shape)} and up {tuple(u.shape)} differ")
        g, u = g.contiguous(), u.contiguous()
        y = torch.empty_like(g)
        n = g.numel()
        block, nw = elementwise_launch(n)
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](g, u, y, n, BLOCK=block, num_warps=nw)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        block, nw = elementwise_launch(n)
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dy, g, u, dg, du, n, BLOCK=block, num_warps=nw)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u with the Triton kernel (same dtype as the inputs)."""
    return SwiGLUFunction.apply(g, u)


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pure torch with fp32 math, rounded once to the input dtype like the kernel."""
    gf = g.float()
    return (gf * torch.sigmoid(gf) * u.float()).to(g.dtype)


def swiglu_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down_proj(silu(gate_proj(x)) * up_proj(x)) for an HF gated MLP; the projections stay modules
    (so PEFT LoRA layers and our NF4+LoRA linears on them keep working)."""
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


# --------------------------------------------------------------------------- dispatch

def is_swiglu_mlp(mod: torch.nn.Module) -> bool:
    """A gated MLP (gate/up/down projections) whose activation is SiLU."""
    if not all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(mod, "act_fn", None)
    return type(act).__name__ in ("SiLU", "SiLUActivation") or act is torch.nn.functional.silu


def patch_swiglu_mlps(root: torch.nn.Module, set_forward) -> tuple[int, int]:
    """Route every SwiGLU MLP under ``root`` through the kernel; (patched, gated MLPs left alone)."""
    n = other = 0
    for _, mod in list(root.named_modules()):
        if is_swiglu_mlp(mod):
            set_forward(mod, MethodType(swiglu_mlp_forward, mod))
            mod._vlm_kind = "swiglu"
            n += 1
        elif all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
            other += 1
    return n, other


class TritonSwiGLUMLP(torch.nn.Module):
    """A gated MLP (gate_proj / up_proj / down_proj) whose activation product runs in Triton."""

    def __init__(self, gate_proj, up_proj, down_proj):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x):
        return swiglu_mlp_forward(self, x)
