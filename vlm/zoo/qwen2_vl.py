"""Tiny Qwen2-VL: ViT (14-px patches, 2x2 PatchMerger) + Qwen2 decoder with multimodal RoPE.

Real Qwen2-VL-2B-Instruct, shrunk: same module tree, tied embeddings, GQA, SwiGLU, RMSNorm,
``mrope_section`` scaled with the head dim (real: head_dim 128 -> [16, 24, 24]; here head_dim 16 ->
[2, 3, 3], which must sum to head_dim / 2). The tokenizer is a byte-level BPE in Qwen2's style
with Qwen's special tokens appended after the base vocabulary, in Qwen's order, so the config's
token ids are "base + offset" exactly as in the real checkpoint (151643 + offset).

Images: min/max pixels 56x56..112x112, so one image is 4..16 tokens after the 2x2 merge
(a 112x112 image = 8x8 patches of 14 px = 64 patches -> 16 ``<|image_pad|>`` tokens).
"""

from __future__ import annotations

from pathlib import Path

from vlm.zoo import common
from vlm.zoo.tokenizer import check_special_ids, train_bpe

VOCAB_SIZE = 896  # tokenizer length == model vocab: every id decodes to something
# Qwen2/Qwen2.5-VL special tokens, in their real order (the real ids are 151643 + index).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
BASE_VOCAB = VOCAB_SIZE - len(SPECIAL_TOKENS)
IDS = {tok: BASE_VOCAB + i for i, tok in enumerate(SPECIAL_TOKENS)}
MROPE_SECTION = (2, 3, 3)  # temporal, height, width rotary pairs; sum = head_dim / 2 = 8
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112

# The chat template of Qwen2-VL-*-Instruct (also used by Qwen2.5-VL), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def text_config_kwargs() -> dict:
    """Qwen2 decoder shape shared by Qwen2-VL and Qwen2.5-VL tiny models."""
    head_dim = common.TEXT_HIDDEN // common.TEXT_HEADS
    assert sum(MROPE_SECTION) == head_dim // 2, "mrope_section must sum to head_dim / 2"
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=common.TEXT_HIDDEN,
        intermediate_size=common.TEXT_INTERMEDIATE,
        num_hidden_layers=common.TEXT_LAYERS,
        num_attention_heads=common.TEXT_HEADS,
        num_key_value_heads=common.TEXT_KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": list(MROPE_SECTION)},
        bos_token_id=IDS["<|endoftext|>"],
        eos_token_id=IDS["<|im_end|>"],
        pad_token_id=IDS["<|endoftext|>"],
        tie_word_embeddings=True,
    )


def token_id_kwargs() -> dict:
    return dict(image_token_id=IDS["<|image_pad|>"], video_token_id=IDS["<|video_pad|>"],
                vision_start_token_id=IDS["<|vision_start|>"], vision_end_token_id=IDS["<|vision_end|>"])


def build_tokenizer():
    """Qwen2Tokenizer on a BPE trained offline; specials appended at IDS."""
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = train_bpe("qwen2", BASE_VOCAB)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None,
                         pad_token=None, errors="replace", model_max_length=32768,
                         clean_up_tokenization_spaces=False)
    # Add the specials in order first (ids BASE_VOCAB + i), then name eos/pad among them.
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    check_special_ids(tok, IDS, length=VOCAB_SIZE)
    return tok


def build_processor(processor_cls, image_processor_cls, video_processor_cls):
    """The family's processor with small pixel limits (one image = 4..16 tokens)."""
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    common_kw = dict(patch_size=14, temporal_patch_size=2, merge_size=2, size=size,
                     image_mean=[0.48145466, 0.4578275, 0.40821073],
                     image_std=[0.26862954, 0.26130258, 0.27577711])
    return processor_cls(image_processor=image_processor_cls(**common_kw),
                         video_processor=video_processor_cls(**common_kw),
                         tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)


def generation_kwargs() -> dict:
    return dict(bos_token_id=IDS["<|endoftext|>"], pad_token_id=IDS["<|endoftext|>"],
                eos_token_id=[IDS["<|im_end|>"], IDS["<|endoftext|>"]], do_sample=False)


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2-VL checkpoint to ``out_dir``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    config = Qwen2VLConfig(
        text_config=text_config_kwargs(),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=common.TEXT_HIDDEN, mlp_ratio=2,
                           num_heads=2, in_channels=3, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, hidden_act="quick_gelu"),
        tie_word_embeddings=True,
        **token_id_kwargs(),
    )
    model = common.build_model(Qwen2VLForConditionalGeneration, config, seed)
    processor = build_processor(Qwen2VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    return common.save_checkpoint(out_dir, model, processor, generation_kwargs())
