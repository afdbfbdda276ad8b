"""End-to-end check: next-token agreement of a quantized variant with the 16-bit model.

For every calibration position t with attention_mask = 1, with p = softmax(logits₁₆) and
q = softmax(logits_quant):
    KL_t = Σ_v p_v (log p_v − log q_v)         mean over positions → ``kl``
    top1 = mean_t [argmax p = argmax q]       → ``top1``

The quantized variant is simulated in place: each layer the variant stores in 4/8 bit gets its
weight replaced by deq(q(W)) from bitsandbytes (vlm.quant.metrics.dequantized), the forward runs,
and the original weights are put back. On bitsandbytes' 4-bit path this is the same arithmetic as
``Linear4bit`` (dequantize, then a matmul in the compute dtype); a test compares it with a real
quantized load.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from vlm.quant.capture import move_batch
from vlm.quant.metrics import dequantized
from vlm.quant.policy import LOW_BIT


@contextmanager
def simulated(model, precisions: dict[str, str], double_quant: bool = True):
    """Temporarily replace the weights of layers with a quantized precision (int8w too) by deq(q(W))."""
    modules = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for name, prec in precisions.items():
                if prec in LOW_BIT:
                    w = modules[name].weight
                    saved[name] = w.data
                    w.data = dequantized(w.data, prec, double_quant)
        yield model
    finally:
        for name, data in saved.items():
            modules[name].weight.data = data


def _logits(model, batches: list[dict]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out = []
    with torch.no_grad():
        for b in batches:
            mb = move_batch(b, device, dtype)
            logits = model(**mb).logits.float()
            mask = mb.get("attention_mask")
            keep = mask.bool() if mask is not None else torch.ones(logits.shape[:2], dtype=torch.bool,
                                                                   device=logits.device)
            out.append(logits[keep])
    return out


def reference_logits(model, batches: list[dict]) -> list[torch.Tensor]:
    return _logits(model, batches)


def agreement(model, precisions: dict[str, str], batches: list[dict], *, double_quant: bool = True,
              reference: list[torch.Tensor] | None = None) -> dict[str, float]:
    """{"kl": mean KL(p₁₆ ‖ q), "top1": top-1 agreement} of the variant ``precisions``."""
    ref = reference if reference is not None else reference_logits(model, batches)
    with simulated(model, precisions, double_quant):
        got = _logits(model, batches)
    kl_sum, same, n = 0.0, 0, 0
    for r, g in zip(ref, got):
        lp, lq = F.log_softmax(r, -1), F.log_softmax(g, -1)
        kl_sum += float((lp.exp() * (lp - lq)).sum(-1).sum())
        same += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += r.shape[0]
    return {"kl": kl_sum / max(n, 1), "top1": same / max(n, 1)}
