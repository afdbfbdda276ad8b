"""Int8Linear: a frozen linear layer stored as int8 weights with one scale per output channel.

The ``dynamic`` policy's cheaper protection tier (precision ``int8w``). Keeping a layer 16-bit
instead of NF4 costs ~1.5 extra bytes per parameter; storing it in int8 costs ~0.5: at the same
bytes, three times the parameters leave NF4, and int8's error is ~0.3 % of NF4's on the demo base
(benchmarks/results/quant_policies_demo_base).

Math (row r of W ∈ ℝ^{out×in}, computed in float32):

    s_r   = max_j |W_rj| / 127                       the row's step (s_r = 1 for an all-zero row)
    q_rj  = round(W_rj / s_r) ∈ [−127, 127]          int8 codes
    Ŵ_rj  = q_rj · s_r                               dequantized weight
    y     = x Ŵᵀ + b                                 forward, Ŵ built in x's dtype

Bounds: |W_rj − Ŵ_rj| ≤ s_r / 2 (round to nearest), so for any input x
    |y_r − ŷ_r| ≤ ‖x‖₁ · s_r / 2     (+ the rounding of Ŵ and of the matmul in x's dtype).

Backward (the ``vlm::int8w_linear`` op's autograd formula): ∂L/∂x = ∂L/∂y · Ŵ with Ŵ rebuilt from q and s, so autograd keeps the
int8 codes between forward and backward, not a 16-bit copy of the weight (as bitsandbytes' 4-bit
matmul does); the frozen weight gets no gradient.

Storage: out·in int8 codes + out float32 steps (``layer_bytes(..., "int8w")`` = out·in + 4·out;
the bias stays in its 16-bit dtype). The layer is weight-only: activations are never quantized
(unlike bitsandbytes' LLM.int8, whose matmul quantizes them too). It subclasses ``nn.Linear`` so
PEFT wraps it in a LoRA layer like any linear (QLoRA-style: frozen base, trained adapter); the int8
``weight`` is a Parameter without grad, which PEFT leaves in its dtype.

Saving: a checkpoint that plain transformers must read stores Ŵ as the 16-bit weight of an
ordinary linear (``dequantized_linears``); re-quantizing those values gives the same codes and steps
(``quantize_rows`` of Ŵ: the row's absmax is 127 · s_r, every other value lies within s_r · 2⁻⁸·127
of a code in bf16), so a reload under the recorded plan computes what the saved model computed.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes q, float32 steps s) of ``weight`` (out × in), per output row; see the module
    docstring."""
    w = weight.detach().float()
    step = w.abs().amax(dim=1) / QMAX
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round(w / step[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, step


def dequantize_rows(codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ = q · s (float32 product, then ``dtype``)."""
    return (codes.float() * step.float()[:, None]).to(dtype)


def int8w_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """deq(q(W)) in W's dtype and device: what an ``Int8Linear`` made from W multiplies by."""
    codes, step = quantize_rows(weight)
    return dequantize_rows(codes, step, weight.dtype)


@torch.library.custom_op("vlm::int8w_linear", mutates_args=())
def int8w_linear(x: torch.Tensor, codes: torch.Tensor, step: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """y = x Ŵᵀ (+ b), Ŵ = q · s rebuilt in x's dtype; backward rebuilds Ŵ again from the codes.

    A torch custom op with its autograd formula (not an ``autograd.Function``): compiled, a
    Function becomes dynamo's ``autograd_function_apply`` higher-order op, which AOTAutograd's cache
    cannot store, so every decoder layer holding an int8w linear compiled again on each warm start
    (H200, Qwen2-VL-7B QLoRA: 3 of 7 graphs bypassed the cache, 10.5 s of a warm start's 18.5 s
    compile). An op is one node that the cache keys like any aten op."""
    return F.linear(x, _rebuilt(codes, step, x.dtype), bias)


@functools.cache
def _fused_dequantize():
    return torch.compile(dequantize_rows, dynamic=True)


def _rebuilt(codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ = (q · s).to(dtype), the same bits as ``dequantize_rows``. On CUDA through one compiled
    kernel (an op's body is opaque to an outer compile, so eager it would be three kernels and two
    float32 copies of the weight: int8 → float32, × s, → 16-bit); elsewhere eagerly. Exact either
    way: one float32 product per element, rounded once to nearest."""
    if codes.is_cuda:
        return _fused_dequantize()(codes, step, dtype)
    return dequantize_rows(codes, step, dtype)


@int8w_linear.register_fake
def _(x, codes, step, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("vlm::int8w_linear_grad_input", mutates_args=())
def int8w_linear_grad_input(grad_y: torch.Tensor, codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """∂L/∂x = ∂L/∂y · Ŵ, Ŵ rebuilt from the codes in ∂L/∂y's dtype."""
    return grad_y.matmul(_rebuilt(codes, step, grad_y.dtype))


@int8w_linear_grad_input.register_fake
def _(grad_y, codes, step):
    return grad_y.new_empty(*grad_y.shape[:-1], codes.shape[1])


def _setup_context(ctx, inputs, output):
    x, codes, step, bias = inputs
    ctx.save_for_backward(codes, step)      # the int8 codes, not a 16-bit copy of Ŵ
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    codes, step = ctx.saved_tensors
    grad_x = int8w_linear_grad_input(grad_y, codes, step) if ctx.needs_input_grad[0] else None
    grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_b


int8w_linear.register_autograd(_backward, setup_context=_setup_context)


class Int8Linear(nn.Linear):
    """y = x (q · s)ᵀ + b with int8 codes q and float32 row steps s (frozen); see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """The int8 layer of ``linear`` (same device; its bias kept in its own dtype)."""
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                  dtype=linear.bias.dtype if linear.bias is not None else None)
        codes, step = quantize_rows(w)
        with torch.no_grad():
            mod.weight.data = codes
            mod.weight_scale.copy_(step)
            if linear.bias is not None:
                mod.bias.data = linear.bias.detach().clone()
        return mod

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return int8w_linear(x, self.weight, self.weight_scale, bias)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def to_linear(self, dtype: torch.dtype) -> nn.Linear:
        """An ordinary ``nn.Linear`` holding Ŵ in ``dtype`` (for saving and merging)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(dtype))
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 per-row"


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quantize_int8w(model: nn.Module, names: list[str] | set[str]) -> int:
    """Replace each named ``nn.Linear`` of ``model`` by its ``Int8Linear``; returns how many."""
    mods = dict(model.named_modules())
    for name in names:
        mod = mods.get(name)
        if type(mod) is not nn.Linear:
            raise ValueError(f"int8w: {name!r} is not a plain nn.Linear of this model "
                             f"(found {type(mod).__name__ if mod is not None else 'nothing'})")
        _swap(model, name, Int8Linear.from_linear(mod))
    return len(names)


def int8w_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]


def dequantize_int8w(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every ``Int8Linear`` by an ``nn.Linear`` holding Ŵ in ``dtype`` (merging, export)."""
    names = int8w_layers(model)
    for name in names:
        _swap(model, name, model.get_submodule(name).to_linear(dtype))
    return len(names)


@contextmanager
def dequantized_linears(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """Every ``Int8Linear`` shown as an ``nn.Linear`` holding Ŵ (what plain transformers can
    load) for the duration, e.g. of ``save_pretrained``; the int8 layers are put back after."""
    saved = [(n, model.get_submodule(n)) for n in int8w_layers(model)]
    for name, mod in saved:
        _swap(model, name, mod.to_linear(dtype))
    try:
        yield model
    finally:
        for name, mod in saved:
            _swap(model, name, mod)
