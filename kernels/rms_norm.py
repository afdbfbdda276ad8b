"""RMSNorm: forward and backward in Triton, fp32 accumulation, any of fp32/fp16/bf16 in and out.

Math (one row x of length N, weight w, eps, weight offset o: 0 for Llama/Qwen/Mistral, 1 for
Gemma, whose norms scale by (1 + w)):

    forward   r   = 1 / sqrt(mean_j(x_j²) + eps)           (saved per row, fp32)
              x̂   = x · r
              y   = x̂ · (o + w)

    backward  g   = dy · (o + w)                             (elementwise)
              dx  = r · (g − x̂ · mean_j(g_j · x̂_j))
              dw  = Σ_rows dy · x̂

Bytes per call (M rows): forward reads x and writes y (2·M·N·itemsize) plus w; backward reads x, dy
and writes dx (3·M·N·itemsize) plus a (programs × N) fp32 partial for dw that torch sums.
HF's LlamaRMSNorm rounds x̂ to the input dtype before multiplying by w; we keep x̂ in fp32 (a rounding
difference of one bf16 ulp at most). Gemma's norm computes all of it in fp32, as we do.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vlm.kernels._util import check_device, interpreting, next_pow2, warps_for


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, M, N, stride_x, stride_y, eps, w_offset,
                    ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + w_offset
    ms = tl.sum(x * x, axis=1) / N
    r = 1.0 / tl.sqrt(ms + eps)
    y = x * r[:, None] * w[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, r, mask=rmask)


@triton.jit
def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, M, N, stride_dy, stride_x, stride_dx, rows_per_prog,
                    w_offset, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + w_offset
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for start in range(row_start, row_end, ROWS):
        rows = start + tl.arange(0, ROWS)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * r[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N
        dx = r[:, None] * (g - xhat * c[:, None])
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
    tl.store(DW_PART + pid * N + cols, dw_acc, mask=cmask)


def _fwd_config(N: int, M: int):
    block_n = next_pow2(N)
    # the interpreter's cost is per program: give it 2-D tiles; a GPU gets one row per program
    # unless rows are short (then pack rows so a program still moves >= 4 KB).
    if interpreting():
        rows = max(1, min(next_pow2(M), 4096 // block_n))
    else:
        rows = max(1, min(16, 2048 // block_n))
    return block_n, rows, warps_for(block_n * rows)


def _rms_fwd(x2: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0):
    M, N = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(M, device=x2.device, dtype=torch.float32)
    block_n, rows, nw = _fwd_config(N, M)
    _rms_fwd_kernel[(triton.cdiv(M, rows),)](x2, w, y, rstd, M, N, x2.stride(0), y.stride(0), eps,
                                             float(offset), ROWS=rows, BLOCK_N=block_n, num_warps=nw)
    return y, rstd


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count


def _rms_bwd(dy2, x2, w, rstd, offset: float = 0.0):
    M, N = x2.shape
    dx = torch.empty_like(x2)
    block_n = next_pow2(N)
    if interpreting():
        programs, rows = 1, max(1, min(next_pow2(M), 4096 // block_n))
    else:
        sms = _sm_count(x2.device.index)
        programs, rows = min(M, 4 * sms), max(1, min(8, 2048 // block_n))
    rows_per_prog = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_prog)
    dw_part = torch.empty(programs, N, device=x2.device, dtype=torch.float32)
    _rms_bwd_kernel[(programs,)](dy2, x2, w, rstd, dx, dw_part, M, N, dy2.stride(0), x2.stride(0),
                                 dx.stride(0), rows_per_prog, float(offset), ROWS=rows, BLOCK_N=block_n,
                                 num_warps=warps_for(block_n * rows))
    return dx, dw_part.sum(0).to(w.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset=0.0):
        check_device(x, weight)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y, rstd = _rms_fwd(x2, weight.contiguous(), eps, offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.shape[-1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx, dw = _rms_bwd(dy2, x2, weight.contiguous(), rstd, ctx.offset)
        return dx.view(dy.shape), (dw if ctx.needs_input_grad[1] else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Triton RMSNorm over the last dimension, scaled by (offset + weight); output dtype = x's."""
    return RMSNormFunction.apply(x, weight, eps, offset)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       offset: float = 0.0) -> torch.Tensor:
    """Pure torch, fp32 math, same rounding points as the kernel (output cast to x's dtype)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.float())
    return y.to(x.dtype)


class TritonRMSNorm(torch.nn.Module):
    """Drop-in for HF ``*RMSNorm`` modules (same ``weight`` parameter and ``variance_epsilon``);
    ``offset`` 1 for Gemma's ``(1 + w)`` norms."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight: torch.nn.Parameter | None = None,
                 offset: float = 0.0):
        super().__init__()
        self.weight = weight if weight is not None else torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.offset = float(offset)

    @classmethod
    def from_module(cls, mod: torch.nn.Module, offset: float = 0.0) -> "TritonRMSNorm":
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
        new = cls(mod.weight.shape[0], eps, weight=mod.weight, offset=offset)
        # kept for unpatch, as a plain attribute: a registered submodule would put the shared weight
        # in the state dict twice (save_pretrained refuses it; FSDP would see one parameter twice)
        object.__setattr__(new, "_replaced", mod)
        return new

    def forward(self, x):
        return rms_norm(x, self.weight, self.variance_epsilon, self.offset)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset}, triton"


# --------------------------------------------------------------------------- dispatch

def is_rms_norm(mod: torch.nn.Module) -> bool:
    """An HF ``*RMSNorm`` with one weight vector (the family says whether it scales by w or 1 + w)."""
    return (type(mod).__name__.endswith("RMSNorm") and not isinstance(mod, TritonRMSNorm)
            and isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 1)


def patch_rms_norms(root: torch.nn.Module, kernels) -> int:
    """Replace every RMSNorm under ``root`` by a ``TritonRMSNorm`` holding the same weight, with the
    family's weight offset (``kernels``: a ``LanguageKernels``). Returns how many were replaced."""
    n = 0
    for name, mod in list(root.named_modules()):
        if is_rms_norm(mod):
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, TritonRMSNorm.from_module(mod, kernels.rms_norm_weight_offset))
            n += 1
    return n


def unpatch_rms_norms(root: torch.nn.Module) -> None:
    for mod in list(root.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, TritonRMSNorm) and hasattr(child, "_replaced"):
                setattr(mod, child_name, child._replaced)
