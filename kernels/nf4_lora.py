"""Fused LoRA linear on an NF4 base: y = x·deq(W)ᵀ + s·(x̃·Aᵀ)·Bᵀ (+ bias), W frozen.

x (M, K), W (N, K) stored as bitsandbytes NF4, A (r, K), B (N, r), scale s; x̃ is the input of the
LoRA path (dropout(x), or x itself).

Fusion: the base and the adapter are ONE matrix product over a concatenated inner dimension,

    y = [x | x̃·Aᵀ] · [deq(W) | s·B]ᵀ          (K + r columns)

The Triton NF4 kernel writes deq(W) straight into the first K columns of the (N, K + r) operand and
s·B goes in the last r, so the LoRA output never exists as its own (M, N) tensor: PEFT's path writes
x·Wᵀ, then (x̃Aᵀ)Bᵀ, then s·(…), then their sum — three extra (M, N) passes.

Backward (dy (M, N); xa = x̃·Aᵀ saved, (M, r)):

    [dx_base | g] = dy · [deq(W) | s·B]         one product; g = s·dy·B  (M, r)
    dx  = dx_base                 (+ g·A into dx̃ for the LoRA input)
    dx̃  = g · A
    dA  = gᵀ · x̃
    dB  = s · dyᵀ · xa

deq(W) is recomputed in the backward (it is never stored: that is the memory of QLoRA).
"""

from __future__ import annotations

import torch

from vlm.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference


def _w_cat(packed, quant_state, B, scale, dtype):
    N, K = quant_state.shape
    r = B.shape[1]
    wc = torch.empty(N, K + r, device=B.device, dtype=dtype)
    dequantize_nf4(packed, quant_state, out=wc[:, :K])
    torch.mul(B.to(dtype), scale, out=wc[:, K:])
    return wc


class NF4LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, A, B, bias, packed, quant_state, scale):
        N, K = quant_state.shape
        dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, K)
        xl2 = x_lora.reshape(-1, K)
        xa = xl2 @ A.to(dtype).t()                                  # (M, r)
        xc = torch.cat([x2, xa], dim=1)                             # (M, K + r)
        wc = _w_cat(packed, quant_state, B, scale, dtype)
        if bias is not None:
            y = torch.addmm(bias.to(dtype), xc, wc.t())
        else:
            y = xc @ wc.t()
        del wc, xc
        ctx.save_for_backward(xl2, xa, A, B, packed)
        ctx.quant_state, ctx.scale, ctx.shape = quant_state, scale, shape
        ctx.has_bias = bias is not None
        return y.view(*shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        xl2, xa, A, B, packed = ctx.saved_tensors
        qs, s = ctx.quant_state, ctx.scale
        N, K = qs.shape
        dtype = xl2.dtype
        dy2 = dy.reshape(-1, N).to(dtype)
        wc = _w_cat(packed, qs, B, s, dtype)
        G = dy2 @ wc                                                # (M, K + r)
        del wc
        g = G[:, K:]                                                # s·dy·B
        dx = G[:, :K].reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        dxl = (g @ A.to(dtype)).reshape(ctx.shape) if ctx.needs_input_grad[1] else None
        dA = (g.t() @ xl2).to(A.dtype) if ctx.needs_input_grad[2] else None
        dB = (dy2.t() @ xa).mul_(s).to(B.dtype) if ctx.needs_input_grad[3] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return dx, dxl, dA, dB, db, None, None, None


def nf4_lora_linear(x, packed, quant_state, A, B, scale: float, bias=None, x_lora=None):
    """y = x·deq(W)ᵀ + scale·(x_lora·Aᵀ)·Bᵀ + bias; ``x_lora`` defaults to x (no dropout)."""
    return NF4LoRAFunction.apply(x, x if x_lora is None else x_lora, A, B, bias, packed, quant_state,
                                 float(scale))


def nf4_lora_linear_reference(x, packed, quant_state, A, B, scale: float, bias=None, x_lora=None):
    """Plain torch: dequantize (torch math), base matmul, separate LoRA matmuls, add (PEFT's order)."""
    w = dequantize_nf4_reference(packed, quant_state, x.dtype)
    xl = x if x_lora is None else x_lora
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    return y + (xl @ A.to(x.dtype).t()) @ B.to(x.dtype).t() * scale


def peft_nf4_lora_forward(layer: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward for a PEFT ``lora.bnb.Linear4bit`` through the fused op. Falls back to the layer's own
    forward whenever the fused path does not express it (adapters disabled or merged, several
    active adapters, DoRA, extra kwargs such as adapter_names)."""
    orig = layer._vlm_orig_forward
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    if (args or kwargs or layer.disable_adapters or layer.merged or len(names) != 1
            or getattr(layer, "use_dora", {}).get(names[0], False)):
        return orig(x, *args, **kwargs)
    name = names[0]
    base = layer.get_base_layer()
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None or qs.quant_type != "nf4":
        return orig(x, *args, **kwargs)
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    dtype = A.dtype if not torch.is_autocast_enabled() else torch.get_autocast_dtype(x.device.type)
    # PEFT computes the base in bnb's compute dtype and LoRA in the adapter dtype; both are the
    # training dtype in practice: run everything in the adapter dtype and return x's dtype.
    xin = x.to(dtype)
    x_lora = layer.lora_dropout[name](xin)
    y = nf4_lora_linear(xin, w.data, qs, A, B, layer.scaling[name], base.bias, x_lora)
    return y.to(x.dtype)


# --------------------------------------------------------------------------- dispatch

def is_peft_nf4_lora(mod: torch.nn.Module) -> bool:
    if not (hasattr(mod, "lora_A") and hasattr(mod, "get_base_layer")):
        return False
    base = mod.get_base_layer()
    qs = getattr(getattr(base, "weight", None), "quant_state", None)
    return type(base).__name__ == "Linear4bit" and qs is not None and qs.quant_type == "nf4"


def patch_peft_nf4_loras(root: torch.nn.Module, set_forward) -> int:
    """Give every PEFT LoRA layer on an NF4 base under ``root`` the fused forward; returns how many."""
    from types import MethodType

    n = 0
    for _, mod in list(root.named_modules()):
        if is_peft_nf4_lora(mod) and not getattr(mod, "_vlm_kind", None):
            set_forward(mod, MethodType(peft_nf4_lora_forward, mod))
            mod._vlm_kind = "nf4_lora"
            n += 1
    return n
