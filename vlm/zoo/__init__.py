"""Offline tiny-model zoo: small random-weight checkpoints of each real architecture.

``build_tiny(variant, out_dir, seed=0)`` writes a checkpoint in the standard Hugging Face layout
(config, safetensors weights, tokenizer trained offline with the family's special tokens and chat
template, image processor, processor config, generation config) that plain
``AutoProcessor.from_pretrained`` / ``AutoModelForImageTextToText.from_pretrained`` load. The same
seed gives byte-identical weights. One builder module per variant.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from vlm.errors import VlmError

# variant -> (builder module, one-line description)
VARIANTS = {
    "qwen2_vl": ("vlm.zoo.qwen2_vl", "Qwen2-VL: ViT + 2x2 PatchMerger + Qwen2 decoder (M-RoPE)"),
    "qwen2_5_vl": ("vlm.zoo.qwen2_5_vl", "Qwen2.5-VL: windowed ViT (RMSNorm, SwiGLU) + Qwen2 decoder"),
    "llava": ("vlm.zoo.llava", "LLaVA-1.5: CLIP ViT + 2-layer MLP projector + Llama"),
    "pixtral": ("vlm.zoo.pixtral", "Pixtral (HF llava layout): Pixtral ViT + projector + Mistral"),
    "mllama": ("vlm.zoo.mllama", "Llama-3.2-Vision: tiled ViT + gated cross-attention Llama"),
    "qwen3_vl": ("vlm.zoo.qwen3_vl", "Qwen3-VL: ViT + merger + DeepStack mergers + Qwen3 decoder (interleaved M-RoPE)"),
    "gemma3": ("vlm.zoo.gemma3", "Gemma 3: SigLIP ViT + pooling projector + Gemma 3 decoder (GeGLU, (1+w) RMSNorm)"),
    "mistral3": ("vlm.zoo.mistral3", "Mistral-Small-3.1: Pixtral ViT + patch-merger projector + Mistral"),
}


def build_tiny(variant: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny checkpoint of ``variant`` to ``out_dir`` (created if missing); return its Path."""
    if variant not in VARIANTS:
        raise VlmError(f"unknown zoo variant {variant!r}; available: {', '.join(VARIANTS)}")
    if not isinstance(seed, int) or seed < 0:
        raise VlmError(f"seed must be a non-negative integer, got {seed!r}")
    module = importlib.import_module(VARIANTS[variant][0])
    return module.build(Path(out_dir), seed=seed)


__all__ = ["VARIANTS", "build_tiny"]
