"""NF4 base linear as a torch custom op: y = x·deq(W)ᵀ, dx = dy·deq(W), deq(W) never saved.

x (..., K), W (N, K) frozen, stored as bitsandbytes NF4 (``vlm.kernels.nf4`` states the storage and
the dequantization math). Forward and backward each dequantize W into a temporary (N, K) buffer
(our Triton kernel on CUDA) and run one cuBLAS matmul:

    forward:   y  = x · deq(W)ᵀ                      (..., N)
    backward:  dx = dy · deq(W)                      (..., K);  no dW: W is frozen

Why a custom op (``torch.library.custom_op``) rather than Python around bitsandbytes: under
``torch.compile`` the autograd graph of a traced dequantize + matmul lets the partitioner *save*
deq(W) for the backward (bitsandbytes' dequantize is a custom op the partitioner will not
recompute) — on Qwen2-VL-2B that stored every dequantized language weight, +4 GiB, the memory
QLoRA exists to avoid. As one opaque op whose backward saves only the packed storage (which lives
in the model anyway), deq(W) cannot be kept: peak memory stays QLoRA's. Dynamo traces around it
without a graph break (a fake implementation gives the output shape).
"""

from __future__ import annotations

import torch


def _deq(packed, code, absmax, code2, absmax2, n: int, k: int, blocksize: int, blocksize2: int,
         offset: torch.Tensor, nested: bool, dtype: torch.dtype) -> torch.Tensor:
    # CPU takes the torch version of the same math, the Triton interpreter too: it rounds fp32 → bf16
    # by truncation where GPU Triton and torch round to nearest even (the kernel has its own tests)
    if packed.device.type == "cuda":
        from vlm.kernels.nf4 import dequantize_nf4_parts

        return dequantize_nf4_parts(packed, code, absmax, code2, absmax2, n, k, blocksize, blocksize2,
                                    offset, nested, dtype)
    from vlm.kernels.nf4 import dequantize_nf4_parts_reference

    return dequantize_nf4_parts_reference(packed, code, absmax, code2, absmax2, n, k, blocksize, blocksize2,
                                          offset, nested, dtype)


@torch.library.custom_op("vlm::nf4_linear", mutates_args=())
def _nf4_linear(x: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, n: int, k: int, blocksize: int,
                blocksize2: int, nested: bool) -> torch.Tensor:
    w = _deq(packed, code, absmax, code2, absmax2, n, k, blocksize, blocksize2, offset, nested, x.dtype)
    return x @ w.t()


@_nf4_linear.register_fake
def _(x, packed, code, absmax, code2, absmax2, offset, n, k, blocksize, blocksize2, nested):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("vlm::nf4_linear_grad_input", mutates_args=())
def _nf4_linear_grad_input(dy: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                           code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, n: int, k: int,
                           blocksize: int, blocksize2: int, nested: bool) -> torch.Tensor:
    w = _deq(packed, code, absmax, code2, absmax2, n, k, blocksize, blocksize2, offset, nested, dy.dtype)
    return dy @ w


@_nf4_linear_grad_input.register_fake
def _(dy, packed, code, absmax, code2, absmax2, offset, n, k, blocksize, blocksize2, nested):
    return dy.new_empty(*dy.shape[:-1], k)


def _setup_context(ctx, inputs, output):
    x, packed, code, absmax, code2, absmax2, offset, *meta = inputs
    ctx.save_for_backward(packed, code, absmax, code2, absmax2, offset)   # storage only: no activation
    ctx.meta = meta


def _backward(ctx, dy):
    dx = _nf4_linear_grad_input(dy, *ctx.saved_tensors, *ctx.meta) if ctx.needs_input_grad[0] else None
    return (dx,) + (None,) * 11   # x, then 6 tensors and 5 numbers without gradients


_nf4_linear.register_autograd(_backward, setup_context=_setup_context)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·deq(W)ᵀ (+ bias) for a bitsandbytes NF4 weight (``Params4bit.data`` + its ``QuantState``).

    Computes in the autocast dtype when autocast is on, else in x's dtype; returns that dtype."""
    from vlm.kernels.nf4 import state_parts

    code, absmax, code2, absmax2, bs2, offset, nested = state_parts(quant_state)
    n, k = quant_state.shape
    return _apply(x, packed, (code, absmax, code2, absmax2, offset), (int(n), int(k), int(quant_state.blocksize),
                                                                      bs2, nested), bias)


def _apply(x, packed, tensors, meta, bias):
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    y = _nf4_linear(x, packed.reshape(-1), *tensors, *meta)
    return y if bias is None else y + bias.to(y.dtype)


_BUFFERS = ("code", "absmax", "code2", "absmax2", "offset")


def attach_nf4_state(layer: torch.nn.Module) -> None:
    """Give a bitsandbytes ``Linear4bit`` its NF4 state as non-persistent buffers + an int tuple.

    Under ``torch.compile`` the forward then reads only module tensors and ints that are equal across
    layers of one shape, so all decoder layers share one compiled graph (reading the per-layer
    ``QuantState`` object would guard on its identity: one recompile per layer). Buffers follow
    ``.to()``; non-persistent, so state dicts are unchanged."""
    from vlm.kernels.nf4 import state_parts

    qs = layer.weight.quant_state
    code, absmax, code2, absmax2, bs2, offset, nested = state_parts(qs)
    for name, t in zip(_BUFFERS, (code, absmax, code2, absmax2, offset)):
        layer.register_buffer(f"_vlm_nf4_{name}", t, persistent=False)
    n, k = qs.shape
    layer._vlm_nf4_meta = (int(n), int(k), int(qs.blocksize), bs2, nested)


def detach_nf4_state(layer: torch.nn.Module) -> None:
    for name in _BUFFERS:
        layer._buffers.pop(f"_vlm_nf4_{name}", None)
    layer.__dict__.pop("_vlm_nf4_meta", None)


def bnb_linear4bit_forward(layer: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward for a bitsandbytes ``Linear4bit`` (NF4) through ``vlm::nf4_linear`` (state attached by
    ``attach_nf4_state``); output in the autocast dtype under autocast, else in x's dtype."""
    tensors = tuple(getattr(layer, f"_vlm_nf4_{name}") for name in _BUFFERS)
    y = _apply(x, layer.weight.data, tensors, layer._vlm_nf4_meta, layer.bias)
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


# --------------------------------------------------------------------------- dispatch

def is_bnb_nf4(mod: torch.nn.Module) -> bool:
    qs = getattr(getattr(mod, "weight", None), "quant_state", None)
    return (type(mod).__name__ == "Linear4bit" and type(mod).__module__.startswith("bitsandbytes")
            and qs is not None and qs.quant_type == "nf4")


def patch_nf4_linears(root: torch.nn.Module, set_forward) -> int:
    """Route every bitsandbytes NF4 ``Linear4bit`` under ``root`` (the frozen vision tower's too)
    through ``vlm::nf4_linear``; returns how many."""
    from types import MethodType

    n = 0
    for _, mod in list(root.named_modules()):
        if is_bnb_nf4(mod) and not getattr(mod, "_vlm_kind", None):
            attach_nf4_state(mod)
            set_forward(mod, MethodType(bnb_linear4bit_forward, mod))
            mod._vlm_kind = "nf4_linear"
            n += 1
    return n
