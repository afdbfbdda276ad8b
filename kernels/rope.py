"""Rotary position embedding (RoPE) and Qwen2-VL's multimodal RoPE (M-RoPE), Q and K in one launch.

Layout: q (B, Hq, S, D), k (B, Hk, S, D) (any strides with unit stride along D, e.g. HF's
``view(B, S, H, D).transpose(1, 2)``); halves x = [x₁ | x₂] of D/2 each ("rotate_half" convention).

Math, per token and head, with cosines c = [c₁ | c₂] and sines s = [s₁ | s₂] of length D:

    forward   y₁ = x₁·c₁ − x₂·s₁            y₂ = x₂·c₂ + x₁·s₂
    backward  dx₁ = dy₁·c₁ + dy₂·s₂         dx₂ = dy₂·c₂ − dy₁·s₁      (the transpose of the rotation)

Standard RoPE reads c and s (B or 1, S, D) as given (HF's rotary module output; for Qwen2-VL in
transformers ≥ 5 that output already holds the M-RoPE recomposition). M-RoPE computes them in the
kernel from 3-row positions p (3, B, S) (temporal, height, width), inverse frequencies f (D/2) and
``mrope_section`` (t, h, w) with t + h + w = D/2:

    for j < D/2:  sec(j) = 0 if j < t, 1 if j < t + h, else 2
                  θ_j = p[sec(j), b, s] · f_j ;  c₁ = c₂ = cos θ,  s₁ = s₂ = sin θ   (fp32)

No gradient flows to c, s or p (HF computes them under no_grad). Bytes: read q, k; write q', k'
(plus c, s per token for standard RoPE; 3 int positions per token for M-RoPE).
"""

from __future__ import annotations

import sys
import threading
from types import MethodType

import torch
import triton
import triton.language as tl

from vlm.kernels._util import check_device, interpreting, next_pow2


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, POS, INVF,
                 sqb, sqh, sqs, skb, skh, sks, sob, soh, sos, skob, skoh, skos,
                 scb, scs, spc, spb, sps,
                 T, S, HQ, HK, HALF, SEC1, SEC2,
                 BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_D: tl.constexpr, MROPE: tl.constexpr, BACKWARD: tl.constexpr):
    # one program = BLOCK_T tokens × all heads of q and of k × D; tiles are [tokens, heads, D/2]
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    m2 = tmask[:, None] & dmask[None, :]
    if MROPE:
        sec = tl.where(d < SEC1, 0, tl.where(d < SEC2, 1, 2))
        pos = tl.load(POS + sec[None, :] * spc + b[:, None] * spb + s[:, None] * sps, mask=m2, other=0)
        f = tl.load(INVF + d, mask=dmask, other=0.0).to(tl.float32)
        theta = pos.to(tl.float32) * f[None, :]
        c1 = tl.cos(theta)
        s1 = tl.sin(theta)
        c2 = c1
        s2 = s1
    else:
        cbase = b[:, None] * scb + s[:, None] * scs + d[None, :]
        c1 = tl.load(COS + cbase, mask=m2, other=0.0).to(tl.float32)
        c2 = tl.load(COS + cbase + HALF, mask=m2, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + cbase, mask=m2, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + cbase + HALF, mask=m2, other=0.0).to(tl.float32)
    if BACKWARD:
        # dx₁ = dy₁c₁ + dy₂s₂ ; dx₂ = dy₂c₂ − dy₁s₁ : the forward code with (s₁, s₂) -> (−s₂, −s₁)
        t = s1
        s1 = -s2
        s2 = -t
    c1 = c1[:, None, :]
    c2 = c2[:, None, :]
    s1 = s1[:, None, :]
    s2 = s2[:, None, :]
    b3 = b[:, None, None]
    s3 = s[:, None, None]
    d3 = d[None, None, :]
    m3 = tmask[:, None, None] & dmask[None, None, :]

    hq = tl.arange(0, BLOCK_HQ)[None, :, None]
    mq = m3 & (hq < HQ)
    qp = Q + b3 * sqb + s3 * sqs + hq * sqh + d3
    q1 = tl.load(qp, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=mq, other=0.0).to(tl.float32)
    op = QO + b3 * sob + s3 * sos + hq * soh + d3
    tl.store(op, (q1 * c1 - q2 * s1).to(QO.dtype.element_ty), mask=mq)
    tl.store(op + HALF, (q2 * c2 + q1 * s2).to(QO.dtype.element_ty), mask=mq)

    hk = tl.arange(0, BLOCK_HK)[None, :, None]
    mk = m3 & (hk < HK)
    kp = K + b3 * skb + s3 * sks + hk * skh + d3
    k1 = tl.load(kp, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=mk, other=0.0).to(tl.float32)
    kop = KO + b3 * skob + s3 * skos + hk * skoh + d3
    tl.store(kop, (k1 * c1 - k2 * s1).to(KO.dtype.element_ty), mask=mk)
    tl.store(kop + HALF, (k2 * c2 + k1 * s2).to(KO.dtype.element_ty), mask=mk)


def _floor_pow2(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, cos, sin, pos, inv_freq, section, backward: bool):
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D or D % 2:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} do not match (D even)")
    q, k = _unit_last(q), _unit_last(k)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    half = D // 2
    mrope = pos is not None
    if mrope:
        sec1, sec2 = section[0], section[0] + section[1]
        if sum(section) != half:
            raise ValueError(f"mrope_section {list(section)} must sum to head_dim/2 = {half}")
        cos_t = sin_t = inv_freq
        scb = scs = 0
        spc, spb, sps = pos.stride()
        pos_t = pos
    else:
        sec1 = sec2 = 0
        # cos/sin: (B or 1, S, D) -> broadcast batch with stride 0
        cos_t, sin_t = cos, sin
        if cos_t.dim() == 2:
            cos_t, sin_t = cos_t.unsqueeze(0), sin_t.unsqueeze(0)
        cos_t, sin_t = _unit_last(cos_t.expand(B, S, D)), _unit_last(sin_t.expand(B, S, D))
        if cos_t.stride() != sin_t.stride():
            cos_t, sin_t = cos_t.contiguous(), sin_t.contiguous()
        scb, scs = cos_t.stride(0), cos_t.stride(1)
        spc = spb = sps = 0
        pos_t = cos_t
    bhq, bhk, bd = next_pow2(HQ), next_pow2(HK), next_pow2(half)
    per_tok = (bhq + bhk) * bd
    T = B * S
    if interpreting():   # the interpreter pays per program: big tiles
        bt = max(1, min(next_pow2(T), _floor_pow2(16384 // per_tok)))
    else:                # >= ~4 K elements per program, at most 4 tokens
        bt = max(1, min(4, _floor_pow2(4096 // per_tok)))
    nw = 4 if bt * per_tok >= 2048 else (2 if bt * per_tok >= 512 else 1)
    _rope_kernel[(triton.cdiv(T, bt),)](q, k, qo, ko, cos_t, sin_t, pos_t, inv_freq if mrope else cos_t,
                           *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3],
                           scb, scs, spc, spb, sps, T, S, HQ, HK, half, sec1, sec2,
                           BLOCK_T=bt, BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_D=bd, MROPE=mrope, BACKWARD=backward,
                           num_warps=nw)
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        check_device(q, k)
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, None, None, None, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_, dk_ = _launch(dq, dk, cos, sin, None, None, None, backward=True)
        return dq_, dk_, None, None


class MRoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, position_ids, inv_freq, section):
        check_device(q, k)
        inv_freq = inv_freq.float().contiguous()
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.section = tuple(section)
        return _launch(q, k, None, None, position_ids, inv_freq, ctx.section, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        pos, inv_freq = ctx.saved_tensors
        dq_, dk_ = _launch(dq, dk, None, None, pos, inv_freq, ctx.section, backward=True)
        return dq_, dk_, None, None, None


def rope(q, k, cos, sin):
    """Apply RoPE to q and k (B, H, S, D) with HF-style cos/sin (B or 1, S, D); one launch."""
    return RoPEFunction.apply(q, k, cos, sin)


def mrope(q, k, position_ids, inv_freq, mrope_section):
    """Qwen2-VL M-RoPE: positions (3, B, S), inverse frequencies (D/2), sections summing to D/2.
    A (B, S) position tensor means plain 1-D RoPE (all three rows equal)."""
    if position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    return MRoPEFunction.apply(q, k, position_ids, inv_freq, tuple(int(x) for x in mrope_section))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """HF's apply_rotary_pos_emb (unsqueeze_dim=1) in fp32, rounded to q's dtype."""
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    qf, kf = q.float(), k.float()
    return ((qf * c + _rotate_half(qf) * s).to(q.dtype), (kf * c + _rotate_half(kf) * s).to(k.dtype))


def mrope_cos_sin_reference(position_ids, inv_freq, mrope_section):
    """cos, sin (B, S, D) the way HF's Qwen2VLRotaryEmbedding builds them (fp32)."""
    if position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    freqs = position_ids[..., None].float() * inv_freq.float()          # (3, B, S, D/2)
    parts = freqs.split(list(mrope_section), dim=-1)
    freqs = torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def mrope_reference(q, k, position_ids, inv_freq, mrope_section):
    cos, sin = mrope_cos_sin_reference(position_ids, inv_freq, mrope_section)
    return rope_reference(q, k, cos, sin)


# --------------------------------------------------------------------------- dispatch
#
# Each language attention module whose modeling file applies the module-level
# ``apply_rotary_pos_emb`` gets a forward wrapper that marks "inside a patched attention"
# (thread-local); that module-level name is pointed at a dispatcher which runs the kernel only
# under the mark and the original function otherwise (unpatched models in the same process are
# untouched). Qwen2-VL's and Qwen3-VL's (interleaved) M-RoPE are folded into HF's cos/sin before
# this function sees them, so the same kernel applies.

_tls = threading.local()
_ROPE_INSTALLED: dict[str, tuple[object, int]] = {}   # module name -> (original fn, users)


def _rope_active() -> bool:
    return getattr(_tls, "depth", 0) > 0


def _make_rope_dispatcher(orig):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsq = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if (_rope_active() and unsq == 1 and q.dim() == 4 and cos.dim() == 3
                and q.shape[-1] == cos.shape[-1] and q.shape[2] == cos.shape[1]
                and (q.is_cuda or interpreting())):
            return rope(q, k, cos, sin)
        return orig(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._vlm_dispatcher = True
    return apply_rotary_pos_emb


def _install_rope(modname: str) -> bool:
    mod = sys.modules.get(modname)
    fn = getattr(mod, "apply_rotary_pos_emb", None) if mod else None
    if fn is None:
        return False
    if modname in _ROPE_INSTALLED:
        orig, users = _ROPE_INSTALLED[modname]
        _ROPE_INSTALLED[modname] = (orig, users + 1)
        return True
    if getattr(fn, "_vlm_dispatcher", False):   # installed by an earlier import of this file
        return True
    _ROPE_INSTALLED[modname] = (fn, 1)
    setattr(mod, "apply_rotary_pos_emb", _make_rope_dispatcher(fn))
    return True


def _uninstall_rope(modname: str) -> None:
    if modname not in _ROPE_INSTALLED:
        return
    orig, users = _ROPE_INSTALLED[modname]
    if users <= 1:
        setattr(sys.modules[modname], "apply_rotary_pos_emb", orig)
        del _ROPE_INSTALLED[modname]
    else:
        _ROPE_INSTALLED[modname] = (orig, users - 1)


def _rope_attention_forward(attn, *args, **kwargs):
    _tls.depth = getattr(_tls, "depth", 0) + 1
    try:
        return attn._vlm_orig_forward(*args, **kwargs)
    finally:
        _tls.depth -= 1


def _uses_module_rope(attn) -> bool:
    """True if the attention's class forward refers to the module-level apply_rotary_pos_emb."""
    fwd = type(attn).forward
    code = getattr(fwd, "__code__", None)
    return code is not None and "apply_rotary_pos_emb" in code.co_names


def patch_rope_attention(root: torch.nn.Module, set_forward) -> tuple[int, int]:
    """Wrap every attention module under ``root`` that applies the module-level RoPE; returns
    (patched, attention modules without rotary embedding, e.g. Mllama's cross-attention)."""
    n = no_rope = 0
    for name, mod in list(root.named_modules()):
        if not (name.endswith("attn") or "Attention" in type(mod).__name__):
            continue
        if not hasattr(mod, "q_proj") or getattr(mod, "_vlm_kind", None):
            continue
        if _uses_module_rope(mod) and _install_rope(type(mod).__module__):
            set_forward(mod, MethodType(_rope_attention_forward, mod))
            mod._vlm_kind = "rope"
            mod._vlm_rope_module = type(mod).__module__
            n += 1
        else:
            no_rope += 1
    return n, no_rope


def unpatch_rope_attention(mod: torch.nn.Module) -> None:
    """Release the module-level dispatcher a patched attention module held (last user restores)."""
    _uninstall_rope(mod.__dict__.pop("_vlm_rope_module"))
