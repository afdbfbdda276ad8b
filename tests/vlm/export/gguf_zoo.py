"""Zoo checkpoints that llama.cpp converts: the zoo model with a 3-block vision tower.

Why not the zoo model as is: llama.cpp's converter maps a projector tensor's index through the
vision tower's block table (``visual.merger.mlp.{bid}``, ``multi_modal_projector.linear_{bid}``
are named like block tensors), so ``mlp.2`` / ``linear_2`` exist only when the tower has at least 3
blocks; the zoo's towers have 2 ("Can not map tensor 'visual.merger.mlp.2.bias'"). This rebuilds
each variant from its own config with one more vision block (same seed, same tokenizer, processor
and chat template files); Qwen2.5-VL's full-attention block moves to the new last block. The zoo
builder's draws that transformers' initialisation would zero are made again (Gemma 3's projector
input projection: left at zero, every image embedding is zero and the image goes unchecked).
"""

from __future__ import annotations

import importlib
from pathlib import Path

VISION_DEPTH = 3


def build_gguf_zoo(variant: str, out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlm.zoo import VARIANTS, build_tiny, common

    out = build_tiny(variant, out_dir, seed=seed)
    config = AutoConfig.from_pretrained(out)
    vision = config.vision_config
    # Qwen towers name their block count `depth`, CLIP and Pixtral `num_hidden_layers`
    setattr(vision, "depth" if hasattr(vision, "depth") else "num_hidden_layers", VISION_DEPTH)
    if getattr(vision, "fullatt_block_indexes", None):
        vision.fullatt_block_indexes = [VISION_DEPTH - 1]
    with common.seeded(seed):
        model = AutoModelForImageTextToText.from_config(config).to(torch.float32).eval()
    # a zoo builder's draws that transformers' init would zero (Gemma 3's projector input projection)
    module = importlib.import_module(VARIANTS[variant][0])
    if hasattr(module, "init_projection"):
        module.init_projection(model, seed)
    model.generation_config = AutoModelForImageTextToText.from_pretrained(out).generation_config
    model.save_pretrained(out)
    return out
