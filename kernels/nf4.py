"""NF4 dequantization of bitsandbytes' 4-bit storage (blocksize 64, with or without double quantization).

Storage (``bnb.nn.Params4bit`` + its ``QuantState``) for a weight of shape (N, K), n = N·K values in
row-major order:

    packed   uint8[n/2]      element e sits in byte e//2: high nibble for even e, low nibble for odd e
    code     fp32[16]        the NF4 table (quantiles of a normal, scaled to [-1, 1])
    absmax   fp32[n/64]      one scale per block of 64 — or, with double quantization (``nested``):
             uint8[n/64]     8-bit codes of the scales, dequantized blockwise with
    state2   code2 fp32[256], absmax2 fp32[n/64/256] (blocksize2 = 256), and a scalar ``offset``

Math:

    nested:   scale_b = code2[absmax_u8[b]] · absmax2[b // 256] + offset
    plain:    scale_b = absmax[b]
    W[e]      = code[nibble(e)] · scale_{e // 64}

Bytes: reads n/2 (packed) + n/64 (scales), writes n·itemsize: for bf16 output 2.52 bytes per
weight, 84% of it the write. No backward: the base weight is frozen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlm.kernels._util import check_device, interpreting


@triton.jit
def _nf4_dequant_kernel(PACKED, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET, OUT, K, stride_out,
                        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                        BLOCK: tl.constexpr):
    # grid: (rows, column blocks); element e = row·K + col of the flattened (N, K) weight
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < K
    e = row * K + col
    byte = tl.load(PACKED + (e >> 1), mask=mask, other=0).to(tl.int32)
    nib = tl.where((e & 1) == 0, byte >> 4, byte & 15)
    q = tl.load(CODE + nib, mask=mask, other=0.0)
    b = e // BLOCKSIZE
    if NESTED:
        a8 = tl.load(ABSMAX + b, mask=mask, other=0).to(tl.int32)
        offset = tl.load(OFFSET)
        scale = tl.load(CODE2 + a8, mask=mask, other=0.0) * tl.load(ABSMAX2 + b // BLOCKSIZE2, mask=mask,
                                                                      other=0.0) + offset
    else:
        scale = tl.load(ABSMAX + b, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_out + col, (q * scale).to(OUT.dtype.element_ty), mask=mask)


def state_parts(quant_state):
    """(code, absmax, code2, absmax2, blocksize2, offset, nested) of a bitsandbytes NF4 QuantState.

    ``offset`` stays a (device) tensor: the kernel loads it, so no call syncs with the host."""
    if quant_state.quant_type != "nf4":
        raise ValueError(f"vlm.kernels.nf4: quant_type {quant_state.quant_type!r} (only nf4)")
    nested = bool(quant_state.nested)
    code = quant_state.code.float().contiguous()
    if nested:
        s2 = quant_state.state2
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=code.device).reshape(1)
        return (code, quant_state.absmax.contiguous(), s2.code.float().contiguous(),
                s2.absmax.float().contiguous(), int(s2.blocksize), offset, nested)
    return code, quant_state.absmax.float().contiguous(), code, code, 256, code, nested


def dequantize_nf4(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize a ``Params4bit`` (its ``.data``) with its ``QuantState`` into (N, K).

    ``out`` may be a (N, ≥K) view with unit column stride (e.g. the first K columns of a wider
    buffer); ``dtype`` defaults to ``quant_state.dtype``."""
    N, K = quant_state.shape
    dtype = dtype or (out.dtype if out is not None else quant_state.dtype)
    if out is None:
        out = torch.empty(N, K, device=packed.device, dtype=dtype)
    if out.shape[0] != N or out.shape[1] != K or out.stride(1) != 1:
        raise ValueError(f"dequantize_nf4: out {tuple(out.shape)} does not fit weight ({N}, {K})")
    code, absmax, code2, absmax2, bs2, offset, nested = state_parts(quant_state)
    return dequantize_nf4_parts(packed, code, absmax, code2, absmax2, N, K, int(quant_state.blocksize), bs2,
                                offset, nested, dtype, out=out)


def dequantize_nf4_parts(packed, code, absmax, code2, absmax2, N: int, K: int, blocksize: int,
                         blocksize2: int, offset: torch.Tensor, nested: bool, dtype: torch.dtype,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_nf4`` on the state's tensors and numbers (``state_parts``), for custom ops.
    ``offset``: a one-element fp32 tensor (read only when ``nested``)."""
    if out is None:
        out = torch.empty(N, K, device=packed.device, dtype=dtype)
    check_device(packed, out)
    block = min(1 << 16 if interpreting() else 1024, triton.next_power_of_2(K))
    _nf4_dequant_kernel[(N, triton.cdiv(K, block))](
        packed.reshape(-1), code, absmax, code2, absmax2, offset, out, K, out.stride(0),
        BLOCKSIZE=int(blocksize), BLOCKSIZE2=int(blocksize2), NESTED=nested, BLOCK=block,
        num_warps=4)
    return out


def dequantize_nf4_parts_reference(packed, code, absmax, code2, absmax2, N: int, K: int, blocksize: int,
                                   blocksize2: int, offset: torch.Tensor, nested: bool, dtype: torch.dtype):
    """Pure torch version of ``dequantize_nf4_parts`` (CPU without the Triton interpreter)."""
    n = N * K
    p = packed.reshape(-1).to(torch.int32)
    nib = torch.stack([p >> 4, p & 15], dim=-1).reshape(-1)[:n].long()
    if nested:
        idx = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
        scale = code2[absmax.long()] * absmax2[idx] + offset.reshape(())
    else:
        scale = absmax.float()
    blocks = torch.arange(n, device=p.device) // blocksize
    return (code[nib] * scale[blocks]).reshape(N, K).to(dtype)


def dequantize_nf4_reference(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None):
    """Pure torch, same math (independent of bitsandbytes' own kernels)."""
    N, K = quant_state.shape
    code, absmax, code2, absmax2, bs2, offset, nested = state_parts(quant_state)
    return dequantize_nf4_parts_reference(packed, code, absmax, code2, absmax2, N, K, int(quant_state.blocksize),
                                          bs2, offset, nested, dtype or quant_state.dtype)
