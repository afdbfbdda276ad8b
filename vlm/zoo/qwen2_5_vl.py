"""Tiny Qwen2.5-VL: windowed ViT (RMSNorm, SwiGLU MLP, full attention on listed blocks) + Qwen2
decoder with multimodal RoPE.

Same tokenizer, special-token ids, chat template, processor limits and text shape as the tiny
Qwen2-VL (see ``vlm.zoo.qwen2_vl``); the vision tower is Qwen2.5-VL's: ``window_size`` 56 px (a
2x2 grid of merged patches per window) and ``fullatt_block_indexes=[1]`` (the last of 2 blocks, as
the real model's last block of each quarter uses full attention).
"""

from __future__ import annotations

from pathlib import Path

from vlm.zoo import common
from vlm.zoo import qwen2_vl as q


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint to ``out_dir``."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    config = Qwen2_5_VLConfig(
        text_config=q.text_config_kwargs(),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=common.TEXT_HIDDEN, in_channels=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu"),
        tie_word_embeddings=True,
        **q.token_id_kwargs(),
    )
    model = common.build_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    processor = q.build_processor(Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    return common.save_checkpoint(out_dir, model, processor, q.generation_kwargs())
