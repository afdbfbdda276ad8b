"""Attention over packed rows without a mask: each sample attends to itself only (varlen attention).

A packed batch (``vlm.data_formats.packing``) is B rows of L tokens holding back-to-back samples.
Flattened to T = B·L tokens, the samples are the segments [c_j, c_{j+1}) of the cumulative
boundaries ``cu_seqlens`` = (0 = c_0 < c_1 < … < c_n = T) (a row's padding tail is a segment of its
own; its outputs are never trained). For every token i of segment j and every head h (grouped-query
heads share key/value head h·H_kv/H):

    out[i, h] = Σ_{t=c_j}^{i} softmax_t(s · q[i, h] · k[t, h_kv]) · v[t, h_kv],   s = scaling

with t further restricted to i - t < W for a sliding window W (and t ranging over the whole segment
for non-causal attention: vision towers, ``causal=False``). That is exactly what the
block-diagonal causal mask gives (``causal(q, k) ∧ sample[q] = sample[k]``), but the work is
Σ_j n_j² instead of L² per row, and no L×L mask exists.

On CUDA with a 16-bit dtype and head size ≤ 256 this is one call of PyTorch's flash-attention
varlen kernels (``aten._flash_attention_forward/backward`` with cumulative sequence lengths),
wrapped as an opaque custom op so compiled decoder layers call it as one node. Elsewhere (CPU, fp32)
it is the same formula as one SDPA call per segment, differentiable by autograd: the reference the
GPU path is tested against, and the CPU training path.

Wiring (:func:`install`): the attention function is registered with transformers' attention
interface as ``vlm_varlen`` and set on the language model's config, so every decoder layer's
attention calls it. A packed forward passes ``cu_seq_lens_q/k`` (transformers' flash-attention keyword
names, which every decoder layer hands on to its attention) and ``vlm_max_seqlen`` and builds no
mask; any other forward (no boundaries: generation, an unpacked batch) gets transformers' SDPA mask
and SDPA, exactly as before.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

NAME = "vlm_varlen"
HOST_BOUNDS = "_vlm_host_bounds"   # attribute of a cu_seqlens tensor: the same boundaries as a host list
_state = threading.local()   # .packed: the current forward carries segment boundaries (no mask needed)


# --- the math ----------------------------------------------------------------------------------

def reference_varlen(q, k, v, cu_seqlens, *, scale: float, window: int | None = None,
                     causal: bool = True, host_bounds: list[int] | None = None) -> torch.Tensor:
    """The formula of the module docstring, one SDPA per segment. q (T, H, D), k/v (T, H_kv, D).
    ``causal=False``: every token of a segment sees the whole segment (vision towers).
    ``host_bounds``: the same boundaries as a host list, where the caller has them: slicing by them
    reads nothing back from the device (``cu_seqlens.tolist()`` would, once per call)."""
    bounds = list(host_bounds) if host_bounds is not None else cu_seqlens.tolist()
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))          # (heads, n, D)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        if window is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        else:
            i = torch.arange(b - a, device=q.device)
            allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        out[a:b] = o.transpose(0, 1)
    return out


# The longest segment reaches the kernels as a 1-element CPU tensor, read when the op runs: inside a
# compiled decoder layer a Python int would be guarded on (one recompile per distinct value).
def _window(causal: bool, window_left: int) -> tuple[int, int]:
    return window_left, (0 if causal else -1)


@torch.library.custom_op("vlmtune::varlen_attention_fwd", mutates_args=())
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_len: torch.Tensor, scale: float, causal: bool,
               window_left: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(max_len)
    left, right = _window(causal, window_left)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, n, n, 0.0, causal, False, scale=scale,
        window_size_left=left, window_size_right=right)
    return out, lse


@_flash_fwd.register_fake
def _(q, k, v, cu_seqlens, max_len, scale, causal, window_left):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("vlmtune::varlen_attention_bwd", mutates_args=())
def _flash_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, cu_seqlens: torch.Tensor, max_len: torch.Tensor, scale: float, causal: bool,
               window_left: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = int(max_len)
    left, right = _window(causal, window_left)
    # dropout is 0: the kernel reads no random state (placeholders, as torch's own varlen wrapper does)
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, n, n, 0.0, causal,
        rng, unused, scale=scale, window_size_left=left, window_size_right=right)
    return dq, dk, dv


@_flash_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_len, scale, causal, window_left):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_len, scale, causal, window_left = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, max_len)
    ctx.scale, ctx.causal, ctx.window_left = scale, causal, window_left


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, max_len = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_len, ctx.scale, ctx.causal,
                            ctx.window_left)
    return dq, dk, dv, None, None, None, None, None


_flash_fwd.register_autograd(_backward, setup_context=_setup)


_SM80: dict[int, bool] = {}   # device index -> flash kernels built for it (filled outside compiled code)


def flash_applies(q: torch.Tensor) -> bool:
    """PyTorch's flash kernels: CUDA (sm80+), fp16/bf16, head size ≤ 256 (multiple of 8)."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0):
        return False
    index = q.device.index or 0
    if index not in _SM80:
        _SM80[index] = torch.cuda.get_device_capability(index)[0] >= 8
    return _SM80[index]


def max_length_tensor(n: int) -> torch.Tensor:
    """The longest segment, as the kernels take it (a CPU tensor: see ``_flash_fwd``)."""
    return torch.tensor([n], dtype=torch.int32)


def varlen_attention(q, k, v, cu_seqlens, max_len: int | torch.Tensor, *, scale: float,
                     window: int | None = None, causal: bool = True, host_bounds: list[int] | None = None):
    """Packed attention, q (T, H, D), k/v (T, H_kv, D) -> (T, H, D): flash varlen where it applies,
    else :func:`reference_varlen` (given ``host_bounds``, the boundaries as a host list, it reads
    nothing back). ``max_len`` ≥ the longest segment (an int or a CPU tensor)."""
    if flash_applies(q):
        if not isinstance(max_len, torch.Tensor):
            max_len = max_length_tensor(max_len)
        out, _ = _flash_fwd(q, k, v, cu_seqlens, max_len, scale, causal, -1 if window is None else window - 1)
        return out
    return reference_varlen(q, k, v, cu_seqlens, scale=scale, window=window, causal=causal,
                            host_bounds=host_bounds)


# --- transformers wiring -----------------------------------------------------------------------

def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """transformers attention-interface function: (B, H, L, D) inputs, (B, L, H, D) output."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:      # not a packed forward: transformers' SDPA with the mask it built
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if dropout:
        raise ValueError("packed varlen attention has no attention dropout; set the model's attention_dropout to 0")
    b, heads, length, dim = query.shape
    flat = lambda x: x.transpose(1, 2).reshape(b * length, x.shape[1], dim)   # noqa: E731
    scale = scaling if scaling is not None else dim ** -0.5
    # the longest sample (a CPU tensor from the packed forward), else the row: an upper bound suffices
    # the reference path slices by the host copy of the boundaries, where the batch shipped one
    # (read only outside compiled code: inside it the flash op takes the device tensor)
    host_bounds = None if torch.compiler.is_compiling() else getattr(cu_seqlens, HOST_BOUNDS, None)
    out = varlen_attention(flat(query), flat(key), flat(value), cu_seqlens, kwargs.get("vlm_max_seqlen", length),
                           scale=scale, window=sliding_window, host_bounds=host_bounds)
    return out.view(b, length, heads, dim), None


def _mask(*args, **kwargs):
    """Mask builder for ``vlm_varlen``: none for a packed forward (boundaries replace it), else SDPA's."""
    if getattr(_state, "packed", False):
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _mask)


def refusal(family, model) -> str | None:
    """Why packed rows of this family/model cannot use varlen attention (they keep the mask), or None."""
    if family.bidirectional_image_attention:
        return (f"{family.name}: image tokens attend to each other both ways inside an image, which a "
                "causal varlen kernel cannot express; packed rows use transformers' block mask")
    config = language_config(model, family)
    if getattr(config, "attn_logit_softcapping", None):
        return f"{family.name}: attention logit soft-capping is not in the varlen kernel; packed rows use the mask"
    return None


def language_config(model, family):
    return family.component_roots(model, "language")[0][1].config


def set_packed(active: bool) -> None:
    """While set, ``vlm_varlen`` builds no mask: the current forward carries segment boundaries.
    Set by the packed forward's pre-hook, cleared by its post-hook (also when the forward raises)."""
    _state.packed = active


def attach_host_bounds(cu_seqlens: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Ride the host copy of the boundaries on the device tensor itself (an attribute, not a keyword
    argument: a list handed to compiled layers would be guarded on, one recompile per batch; and the
    tensor is what activation checkpointing hands the recomputed layer again)."""
    setattr(cu_seqlens, HOST_BOUNDS, list(bounds))
    return cu_seqlens


def install(model, family):
    """Route the language model's attention through ``vlm_varlen``; returns a function restoring it."""
    register()
    if torch.cuda.is_available():   # the capability read happens here, not inside a compiled layer
        flash_applies(torch.empty(0, 8, device="cuda", dtype=torch.bfloat16))
    config = language_config(model, family)
    previous = config._attn_implementation
    config._attn_implementation = NAME
    return lambda: setattr(config, "_attn_implementation", previous)
