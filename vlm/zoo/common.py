"""Pieces every tiny builder shares: seeded construction, saving in the standard HF layout, sizes.

A zoo checkpoint is the real transformers architecture with tiny dimensions and random weights,
saved exactly as a hub checkpoint is (config.json, model.safetensors, generation_config.json,
tokenizer + processor files, chat template), so plain ``from_pretrained`` loads it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from vlm.errors import VlmError

# Text-model shape shared by the zoo (the real models, shrunk): GQA with 4 query heads over 2 KV
# heads of 16 dims, SwiGLU MLP, RMSNorm, 2 layers.
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
MAX_BYTES = 3 * 1024 * 1024  # a zoo checkpoint's weights stay under 3 MB


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run model construction under a fixed CPU RNG state without disturbing the caller's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(model_cls: Any, config: Any, seed: int) -> torch.nn.Module:
    """Instantiate ``model_cls(config)`` in float32 on CPU with weights drawn from ``seed``."""
    with seeded(seed):
        model = model_cls(config).to(torch.float32)
    model.eval()
    return model


def save_checkpoint(out_dir: str | Path, model: torch.nn.Module, processor: Any,
                    generation: dict[str, Any]) -> Path:
    """Write model, processor (tokenizer, image processor, chat template) and generation config."""
    from transformers import GenerationConfig

    from vlm.checkpoint_layout import save_model

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VlmError(f"zoo output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(**generation)
    save_model(model, out)   # the hub's tensor names (Family.hub_layout), as real checkpoints have
    processor.save_pretrained(out)
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    if weights > MAX_BYTES:
        raise VlmError(f"zoo checkpoint {out} has {weights} bytes of weights (> {MAX_BYTES}): shrink it")
    return out

