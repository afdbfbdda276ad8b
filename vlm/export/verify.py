"""Does a merged checkpoint compute what base + adapter computes? Logits on an image-text probe.

Tolerances (max |Δlogit| over every position and vocab entry, relative to max |logit|): merging
changes only rounding — W + s·B·A is rounded once instead of x·W and s·(x·A)·B separately — so
float32 agrees to ~1e-6 relative and 16-bit dtypes to a few units of their epsilon (bf16 ε = 2^-8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlm.errors import VlmError

# relative tolerance on max|Δlogit| / max|logit|, per dtype
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def probe_image(size: int = 112, seed: int = 0, height: int | None = None):
    """A deterministic RGB test image (random noise with a gradient), ``size`` wide, ``height``
    (default: ``size``) high."""
    import numpy as np
    from PIL import Image

    height = height or size
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 255, size)[None, :, None].repeat(height, 0).repeat(3, 2)
    arr = (0.5 * grad + 0.5 * rng.integers(0, 256, (height, size, 3))).astype("uint8")
    return Image.fromarray(arr)


def probe_messages(text: str = "Describe the image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def probe_inputs(processor: Any, text: str = "Describe the image.", image=None) -> dict:
    """Tokenized chat with one image, as the processor's own chat template lays it out (one BOS:
    a template that writes it gets none added, as vLLM and ``apply_chat_template`` do)."""
    from vlm.data_formats.chat_render import adds_bos

    prompt = processor.apply_chat_template(probe_messages(text), add_generation_prompt=True)
    return dict(processor(text=[prompt], images=[image or probe_image()], return_tensors="pt",
                          add_special_tokens=adds_bos(processor.tokenizer, prompt)))


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits.float()


def compare_merged(adapter: str | Path, merged: str | Path, *, base: str | None = None) -> dict:
    """Max |Δlogit| between base+adapter (PEFT, unmerged) and the merged folder; raises if too big."""
    from peft import PeftModel

    from vlm.export.adapter import read_adapter
    from vlm.export.merge import dequantize_bnb
    from vlm.export.metadata import read_metadata
    from vlm.load import load

    mm, processor = load(merged, dtype=_dtype_of(merged), device="cpu")
    meta = read_metadata(merged)
    info = read_adapter(adapter)
    base = base or meta.get("base_model") or info.base_model
    bm, _ = load(base, dtype=mm.dtype, device="cpu", quant=meta.get("trained_on_quant"))
    dequantize_bnb(bm, mm.dtype)
    pm = PeftModel.from_pretrained(bm, str(info.path)).eval()
    inputs = probe_inputs(processor)
    a, b = logits(pm, inputs), logits(mm.eval(), inputs)
    diff = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), 1e-6)
    tol = TOLERANCE.get(mm.dtype, 5e-2)
    result = {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / scale, "tolerance": tol,
              "dtype": str(mm.dtype).replace("torch.", ""), "ok": diff / scale <= tol}
    if not result["ok"]:
        raise VlmError(f"merged model {merged} differs from base+adapter: max |Δlogit| {diff:.3g} "
                       f"= {diff / scale:.3g} of max |logit|, above the {tol:g} tolerance for {result['dtype']}")
    return result


def _dtype_of(folder: str | Path) -> torch.dtype:
    import json

    d = json.loads((Path(folder) / "config.json").read_text()).get("dtype") or "bfloat16"
    return {"float32": torch.float32, "float16": torch.float16}.get(d, torch.bfloat16)
