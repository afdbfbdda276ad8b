"""Tiny Qwen3-VL: ViT (16-px patches, learned position embedding, 2x2 merger, DeepStack mergers) +
Qwen3 decoder (q/k RMSNorm) with interleaved multimodal RoPE.

Real Qwen3-VL-8B-Instruct, shrunk: vision depth 2 with ``deepstack_visual_indexes=[0, 1]`` (real:
27 blocks, [8, 16, 24]); each DeepStack merger turns the features of its vision block into an
extra embedding added to the image positions of one decoder layer (index i feeds layer i), so both
tiny decoder layers receive vision features directly. Text: head_dim 16, ``mrope_section``
[3, 3, 2] (real [24, 20, 20] of 64 rotary pairs; here 8 pairs) interleaved T,H,W,T,H,W,... as
``mrope_interleaved`` says; untied embeddings as the 8B.

Tokenizer: Qwen2-style byte-level BPE, then the 22 Qwen2 special tokens and Qwen3's 4 additions
(``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>``) in their real order, so the
config's ids are "base + offset" exactly as in the real checkpoint (151643 + offset).

Images: 16-px patches, min/max pixels 64x64..128x128 -> 4..16 ``<|image_pad|>`` tokens.
"""

from __future__ import annotations

from pathlib import Path

from vlm.zoo import common
from vlm.zoo import qwen2_vl as q2
from vlm.zoo.tokenizer import check_special_ids, train_bpe

VOCAB_SIZE = 896
SPECIAL_TOKENS = q2.SPECIAL_TOKENS + ("<tool_response>", "</tool_response>", "<think>", "</think>")
BASE_VOCAB = VOCAB_SIZE - len(SPECIAL_TOKENS)
IDS = {tok: BASE_VOCAB + i for i, tok in enumerate(SPECIAL_TOKENS)}
MROPE_SECTION = (3, 3, 2)  # rotary pairs for t, h, w (interleaved); sum = head_dim / 2 = 8
PATCH_SIZE = 16
MIN_PIXELS = 64 * 64
MAX_PIXELS = 128 * 128

# Qwen3-VL-*-Instruct's chat template without the tool-calling branches: no default system
# prompt (unlike Qwen2-VL), images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{ content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer():
    """Qwen2Tokenizer (Qwen3-VL ships the same class) on a BPE trained offline; specials at IDS."""
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = train_bpe("qwen2", BASE_VOCAB)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None,
                         pad_token=None, errors="replace", model_max_length=262144,
                         clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    check_special_ids(tok, IDS, length=VOCAB_SIZE)
    return tok


def config_kwargs() -> dict:
    head_dim = common.TEXT_HIDDEN // common.TEXT_HEADS
    assert sum(MROPE_SECTION) == head_dim // 2, "mrope_section must sum to head_dim / 2"
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=common.TEXT_HIDDEN,
                intermediate_size=common.TEXT_INTERMEDIATE, num_hidden_layers=common.TEXT_LAYERS,
                num_attention_heads=common.TEXT_HEADS, num_key_value_heads=common.TEXT_KV_HEADS,
                head_dim=head_dim, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                 "mrope_section": list(MROPE_SECTION), "mrope_interleaved": True},
                bos_token_id=IDS["<|endoftext|>"], eos_token_id=IDS["<|im_end|>"],
                pad_token_id=IDS["<|endoftext|>"], tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                  patch_size=PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=common.TEXT_HIDDEN, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=False,
                image_token_id=IDS["<|image_pad|>"], video_token_id=IDS["<|video_pad|>"],
                vision_start_token_id=IDS["<|vision_start|>"], vision_end_token_id=IDS["<|vision_end|>"])


def build_processor():
    # top-level names: the module files differ between transformers 5.17 and 5.19
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    kw = dict(patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=2, size=size,
              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**kw),
                            video_processor=Qwen3VLVideoProcessor(**kw),
                            tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen3-VL checkpoint to ``out_dir``."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    model = common.build_model(Qwen3VLForConditionalGeneration, Qwen3VLConfig(**config_kwargs()), seed)
    generation = dict(bos_token_id=IDS["<|endoftext|>"], pad_token_id=IDS["<|endoftext|>"],
                      eos_token_id=[IDS["<|im_end|>"], IDS["<|endoftext|>"]], do_sample=False)
    return common.save_checkpoint(out_dir, model, build_processor(), generation)
