"""Quantization error and storage size of one linear layer, with bitsandbytes' own functions.

deq(q(W)) is computed with ``bitsandbytes.functional``: ``quantize_4bit``/``dequantize_4bit``
(blocks of 64, absmax per block; with double quantization the absmax values are themselves
quantized to 8 bit in blocks of 256), and ``int8_vectorwise_quant`` for int8 (row-wise absmax,
W ≈ C · s/127; LLM.int8's fp16 outlier split is not simulated, so this is an upper bound); int8w
(weight-only, row-wise absmax in float32) with vlm.quant.int8_linear's own function, i.e. exactly
what ``Int8Linear.forward`` multiplies by.
On the 4-bit path this is exactly what ``Linear4bit.forward`` multiplies by.

    weight error      e_w = ‖W − deq(q(W))‖_F / ‖W‖_F
    activation error  e_a = ‖X Wᵀ − X deq(q(W))ᵀ‖_F / ‖X Wᵀ‖_F      (X: calibration inputs)

Bytes per layer (out × in weight, bias kept 16-bit):
    16-bit  2 · out · in
    int8    out · in + 4 · out                       (int8 codes + fp32 row scale)
    int8w   out · in + 4 · out                       (the same layout: vlm.quant.int8_linear)
    4-bit   out · in / 2 + n_b · 4                   (n_b = ⌈out·in/64⌉ fp32 absmax)
    4-bit + double quant   out · in / 2 + n_b + ⌈n_b/256⌉ · 4 + 4   (uint8 absmax, fp32 per 256)
"""

from __future__ import annotations

import math

import torch

BLOCKSIZE = 64          # bitsandbytes Linear4bit default
DQ_BLOCKSIZE = 256      # blocksize of the nested (double) quantization of the absmax values


def dequantized(weight: torch.Tensor, precision: str, double_quant: bool = True) -> torch.Tensor:
    """deq(q(W)) in W's dtype and device, for precision nf4 / fp4 / int8 (16-bit: W itself)."""
    import bitsandbytes.functional as bnbf

    if precision in ("bf16", "fp16"):
        return weight
    w = weight.detach()
    if precision in ("nf4", "fp4"):
        q, state = bnbf.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE,
                                      compress_statistics=double_quant, quant_type=precision)
        return bnbf.dequantize_4bit(q, state).to(weight.dtype).reshape(weight.shape)
    if precision == "int8w":
        from vlm.quant.int8_linear import int8w_dequantized

        return int8w_dequantized(w)
    if precision == "int8":
        codes, row_stats, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
        return (codes.float() * (row_stats.float()[:, None] / 127.0)).to(weight.dtype)
    raise ValueError(f"unknown precision {precision!r}")


def weight_error(weight: torch.Tensor, deq: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F in float32."""
    w = weight.detach().float()
    denom = w.norm()
    if denom == 0:
        return 0.0
    return float((w - deq.float()).norm() / denom)


def activation_error(x: torch.Tensor, weight: torch.Tensor, deq: torch.Tensor,
                     chunk: int = 1024) -> float:
    """‖X Wᵀ − X Ŵᵀ‖_F / ‖X Wᵀ‖_F in float32, X of shape (rows, in); rows processed in chunks."""
    w = weight.detach().float()
    diff = w - deq.float()
    num = torch.zeros((), dtype=torch.float64, device=w.device)
    den = torch.zeros((), dtype=torch.float64, device=w.device)
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk].to(device=w.device, dtype=torch.float32)
        num += (xc @ diff.T).pow(2).sum(dtype=torch.float64)
        den += (xc @ w.T).pow(2).sum(dtype=torch.float64)
    if den == 0:
        return 0.0
    return float((num / den).sqrt())


def layer_bytes(out_features: int, in_features: int, precision: str, double_quant: bool = True,
                bias: bool = False) -> int:
    """Storage bytes of one linear layer under ``precision`` (see the module docstring)."""
    n = out_features * in_features
    b = 2 * out_features if bias else 0
    if precision in ("bf16", "fp16"):
        return 2 * n + b
    if precision in ("int8", "int8w"):
        return n + 4 * out_features + b
    if precision in ("nf4", "fp4"):
        nb = math.ceil(n / BLOCKSIZE)
        if double_quant:
            return math.ceil(n / 2) + nb + math.ceil(nb / DQ_BLOCKSIZE) * 4 + 4 + b
        return math.ceil(n / 2) + 4 * nb + b
    raise ValueError(f"unknown precision {precision!r}")
