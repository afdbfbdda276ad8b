"""Fused linear cross-entropy: mean CE of (hidden · Wᵀ + b) against labels without ever holding the
full (N × V) logits. Rows are processed in chunks of C; each chunk's logits live only while its
gradients are formed, then are dropped.

Math, per row i with label yᵢ (rows with yᵢ = ignore_index count zero), logits zᵢ = hᵢ·Wᵀ + b,
divisor D = number of non-ignored rows (or ``num_items`` when given, like HF's num_items_in_batch):

    lseᵢ   = log Σ_v exp(zᵢᵥ)
    loss   = (1/D) Σ_i (lseᵢ − zᵢ,yᵢ)
    ∂loss/∂zᵢᵥ = (softmax(zᵢ)ᵥ − [v = yᵢ]) / D   =: gᵢᵥ      (0 for ignored rows)
    dh = g · W        dW = gᵀ · h        db = Σ_i gᵢ

With logit soft-capping at c (Gemma 2's ``final_logit_softcapping``; a Gemma 3 config may set it),
the CE reads capped logits ẑ = c·tanh(z/c) and the chain rule adds a factor per logit:

    tᵢᵥ = tanh(zᵢᵥ / c)     ẑᵢᵥ = c·tᵢᵥ     ∂loss/∂zᵢᵥ = (softmax(ẑᵢ)ᵥ − [v = yᵢ]) · (1 − tᵢᵥ²) / D

Per chunk: one matmul gives z (C × V, in the hidden dtype, as HF's lm_head does); one Triton pass reads
each row twice (online max/sum, then gradient) and overwrites z with g in place; two matmuls give
the chunk's rows of dh and add into dW. The gradients are computed in the forward (the backward only
scales them by the incoming gradient), so nothing of size V·N is kept for the backward.
Extra memory: C·V·itemsize for the chunk, N fp32 row losses, and dh/dW (the gradients themselves);
dW accumulates in W's dtype (addmm with fp32 accumulation inside each matmul).
"""

from __future__ import annotations

from types import MethodType

import torch
import triton
import triton.language as tl

from vlm.kernels._util import check_device, interpreting, next_pow2


@triton.jit
def _softcap(z, cap):
    # c·tanh(z/c), tanh written as 2σ(2x) − 1 (exact in fp32, no libdevice call needed)
    return cap * (2.0 * tl.sigmoid(2.0 * z / cap) - 1.0)


@triton.jit
def _ce_grad_kernel(Z, LABELS, LOSS, N, V, stride_z, ignore_index, INV_DIV, cap,
                    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    label = tl.load(LABELS + rows, mask=rmask, other=ignore_index)
    valid = (label != ignore_index) & rmask
    cols = tl.arange(0, BLOCK_V)
    # pass 1: running max and running sum of exp
    m = tl.full([ROWS], float("-inf"), tl.float32)
    ssum = tl.zeros([ROWS], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        mask = rmask[:, None] & (c[None, :] < V)
        z = tl.load(Z + r64[:, None] * stride_z + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = _softcap(z, cap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        ssum = ssum * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    lse = m + tl.log(tl.where(ssum > 0, ssum, 1.0))
    safe_label = tl.where(valid, label, 0).to(tl.int64)
    z_y = tl.load(Z + r64 * stride_z + safe_label, mask=valid, other=0.0).to(tl.float32)
    if SOFTCAP:
        z_y = _softcap(z_y, cap)
    tl.store(LOSS + rows, tl.where(valid, lse - z_y, 0.0), mask=rmask)
    # pass 2: overwrite logits with the gradient (softmax - onehot) / D, zero for ignored rows
    # (1/D read from device memory: a count on the GPU reaches the kernel without a host read)
    scale = tl.where(valid, tl.load(INV_DIV), 0.0)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        mask = rmask[:, None] & (c[None, :] < V)
        ptr = Z + r64[:, None] * stride_z + c[None, :]
        z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            zc = _softcap(z, cap)
            t = zc / cap
            p = tl.exp(zc - lse[:, None])
            p = tl.where(c[None, :] == safe_label[:, None], p - 1.0, p) * (1.0 - t * t)
        else:
            p = tl.exp(z - lse[:, None])
            p = tl.where(c[None, :] == safe_label[:, None], p - 1.0, p)
        tl.store(ptr, (p * scale[:, None]).to(Z.dtype.element_ty), mask=mask)


def _ce_launch(z: torch.Tensor, labels: torch.Tensor, loss_rows: torch.Tensor, ignore_index: int,
               inv_div: torch.Tensor, softcap: float | None = None):
    n, v = z.shape
    if interpreting():
        block_v = min(next_pow2(v), 1024)
        rows = max(1, min(next_pow2(n), 8192 // block_v))
        nw = 4
    else:
        block_v, rows, nw = min(next_pow2(v), 4096), 1, 8
    _ce_grad_kernel[(triton.cdiv(n, rows),)](z, labels, loss_rows, n, v, z.stride(0), ignore_index,
                                             inv_div, float(softcap or 1.0), ROWS=rows, BLOCK_V=block_v,
                                             SOFTCAP=bool(softcap), num_warps=nw)


def default_chunk_rows(n: int, v: int, weight_grad: bool = False) -> int:
    """Rows per chunk: about 1/16 of the rows (so a chunk's logits are ≤ 1/8 of the full logits even
    with the temporaries), at least 256 rows for matmul efficiency, a multiple of 64. When W trains,
    every chunk re-reads and re-writes all of dW (V·H): 1/10 of the rows halves that traffic while a
    chunk's logits stay under 1/8 of the full logits."""
    c = max(256, -(-n // (10 if weight_grad else 16)))
    c = -(-c // 64) * 64
    return min(n, c)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, num_items, chunk_rows, softcap=None):
        check_device(hidden, weight)
        h = hidden.reshape(-1, hidden.shape[-1])
        if not h.is_contiguous():
            h = h.contiguous()
        lab = labels.reshape(-1).to(torch.int64)
        if lab.numel() != h.shape[0]:
            raise ValueError(f"fused CE: {h.shape[0]} hidden rows but {lab.numel()} labels")
        n = h.shape[0]
        v = weight.shape[0]
        # 1/D stays on the device (a 1-element fp32 tensor the kernel loads): reading the count
        # on the host would make it wait for the GPU once per micro-batch
        if num_items is None:
            div = (lab != ignore_index).sum()
        elif torch.is_tensor(num_items):
            div = num_items.to(h.device, non_blocking=True)
        else:
            div = torch.tensor(float(num_items))
        div = div.to(h.device, torch.float32, non_blocking=True).reshape(1)
        inv_div = torch.where(div > 0, 1.0 / div.clamp(min=1e-30), torch.zeros_like(div))
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        w = weight.to(h.dtype) if weight.dtype != h.dtype else weight
        dh = torch.empty_like(h) if need_dh else None
        dw = torch.zeros_like(w) if need_dw else None
        db = torch.zeros(v, device=h.device, dtype=torch.float32) if need_db else None
        loss_rows = torch.empty(n, device=h.device, dtype=torch.float32)
        c = chunk_rows or default_chunk_rows(n, v, need_dw)
        for s in range(0, n, c):
            e = min(n, s + c)
            hc = h[s:e]
            z = hc @ w.t()
            if bias is not None:
                z += bias.to(z.dtype)
            _ce_launch(z, lab[s:e], loss_rows[s:e], ignore_index, inv_div, softcap)
            if need_dh:
                torch.mm(z, w, out=dh[s:e])
            if need_dw:
                dw.addmm_(z.t(), hc)
            if need_db:
                db += z.float().sum(0)
            del z
        loss = loss_rows.sum() * inv_div[0]
        ctx.save_for_backward(dh if need_dh else None, dw if need_dw else None, db)
        ctx.hidden_shape = hidden.shape
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, go):
        dh, dw, db = ctx.saved_tensors
        hd, wd, bd = ctx.dtypes
        # always scaled by the incoming gradient (exact when it is 1): asking whether it is 1
        # would read it on the host, a wait for the GPU per micro-batch
        if dh is not None:
            dh = (dh * go.to(dh.dtype)).view(ctx.hidden_shape).to(hd)
        if dw is not None:
            dw = (dw * go.to(dw.dtype)).to(wd)
        if db is not None:
            db = (db * go).to(bd)
        return dh, dw, db, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index: int = -100,
                               num_items=None, chunk_rows: int | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T (+ bias)`` vs ``labels`` (rows = all leading dims), chunked.
    ``num_items``: divide the summed loss by this instead of the count of non-ignored labels.
    ``softcap``: cap the logits at ±softcap with c·tanh(z/c) first (None or 0: no cap)."""
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, bias, labels, ignore_index, num_items,
                                                 chunk_rows, softcap or None)


def fused_linear_cross_entropy_reference(hidden, weight, labels, bias=None, ignore_index: int = -100,
                                         num_items=None, softcap: float | None = None) -> torch.Tensor:
    """Plain torch: full logits in the hidden dtype (soft-capped like HF's Gemma when ``softcap``),
    upcast to fp32, F.cross_entropy (HF's path)."""
    logits = torch.nn.functional.linear(hidden, weight.to(hidden.dtype),
                                        None if bias is None else bias.to(hidden.dtype))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    logits = logits.reshape(-1, logits.shape[-1])
    lab = labels.reshape(-1)
    if num_items is None:
        return torch.nn.functional.cross_entropy(logits, lab, ignore_index=ignore_index)
    return torch.nn.functional.cross_entropy(logits, lab, ignore_index=ignore_index,
                                             reduction="sum") / num_items


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    def __init__(self, ignore_index: int = -100, chunk_rows: int | None = None):
        super().__init__()
        self.ignore_index, self.chunk_rows = ignore_index, chunk_rows

    def forward(self, hidden, weight, labels, bias=None, num_items=None):
        return fused_linear_cross_entropy(hidden, weight, labels, bias, self.ignore_index, num_items,
                                          self.chunk_rows)


# --------------------------------------------------------------------------- dispatch
#
# The top-level ``*ForConditionalGeneration`` forward is wrapped: in training with ``labels``,
# lm_head passes hidden states through, and the loss is the fused linear CE over shifted labels
# (HF's causal-LM loss: ignore_index -100, ``num_items_in_batch`` honoured, logits soft-capped
# where the model's forward caps them); ``logits`` is None. Evaluation (``model.eval()``) or no
# labels: the original forward, logits included.

def _lm_head_forward(head, x):
    if getattr(head, "_vlm_passthrough", False):
        return x
    return head._vlm_orig_forward(x)


def _ce_forward(hf, *args, **kwargs):
    labels = kwargs.get("labels")
    if labels is None or not hf.training:
        return hf._vlm_orig_forward(*args, **kwargs)
    head = hf.get_output_embeddings()
    kw = dict(kwargs, labels=None)
    head._vlm_passthrough = True
    try:
        out = hf._vlm_orig_forward(*args, **kw)
    finally:
        head._vlm_passthrough = False
    hidden = out.logits
    if hidden.shape[1] != labels.shape[1]:
        raise ValueError("fused CE: logits_to_keep / sliced hidden states do not match labels; "
                         "call with logits_to_keep=0 in training")
    hidden = hidden.to(head.weight.dtype)
    shift = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100).to(hidden.device)
    num_items = kwargs.get("num_items_in_batch")
    loss = fused_linear_cross_entropy(hidden, head.weight, shift, bias=head.bias, ignore_index=-100,
                                      num_items=num_items, softcap=hf.__dict__.get("_vlm_logit_softcap"))
    out.loss = loss
    out.logits = None
    return out


def logit_softcap(config) -> float | None:
    """The text config's ``final_logit_softcapping`` (Gemma 2; None in Gemma 3's released configs)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "final_logit_softcapping", None) or None


def patch_cross_entropy(hf: torch.nn.Module, set_forward, softcap: float | None = None) -> str | None:
    """Route ``hf``'s training loss through the fused CE (logits soft-capped at ``softcap`` when
    the model's forward caps them); returns why not, or None when patched."""
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is None or type(head) is not torch.nn.Linear:
        return (f"lm_head is {type(head).__name__}, not a plain Linear (quantized or adapted "
                "lm_head): HF loss kept")
    set_forward(head, MethodType(_lm_head_forward, head))
    head._vlm_kind = "lm_head"
    set_forward(hf, MethodType(_ce_forward, hf))
    hf.__dict__["_vlm_logit_softcap"] = softcap
    return None
