"""Tiny LLaVA-1.5: CLIP ViT + 2-layer GELU MLP projector + Llama decoder (llava-hf layout).

Real llava-1.5-7b-hf, shrunk: CLIP with 14-px patches at 42 px (real: 336 px) -> (42/14)^2 = 9
patch features per image (the CLS token is dropped: ``vision_feature_select_strategy="default"``),
taken from the second-to-last CLIP layer (``vision_feature_layer=-2``, as the real model does, so
the last CLIP layer and its post-layernorm receive no gradient). Untied Llama embeddings, GQA,
SwiGLU, RMSNorm.

Tokenizer: SentencePiece-style BPE (``LlamaTokenizer``: ``▁`` word marks, byte fallback) with
``<unk> <s> </s>`` at 0, 1, 2 and bytes at 3..258 like Llama 2; ``<image>`` and ``<pad>`` appended
right after the base vocabulary, as llava-hf appends them at 32000 and 32001.
"""

from __future__ import annotations

from pathlib import Path

from vlm.zoo import common
from vlm.zoo.tokenizer import check_special_ids, train_bpe

VOCAB_SIZE = 960  # tokenizer length == model vocab
HEAD_SPECIALS = ("<unk>", "<s>", "</s>")
TAIL_SPECIALS = ("<image>", "<pad>")
BASE_VOCAB = VOCAB_SIZE - len(TAIL_SPECIALS)
IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": BASE_VOCAB, "<pad>": BASE_VOCAB + 1}
IMAGE_SIZE = 42
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 9 <image> tokens per image
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# llava-hf/llava-1.5-*-hf chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer():
    """LlamaTokenizer (SentencePiece-style BPE, adds <s>) with <image>, <pad> appended."""
    from transformers import AddedToken, LlamaTokenizer

    vocab, merges = train_bpe("spm", BASE_VOCAB, HEAD_SPECIALS)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>",
                         eos_token="</s>", add_bos_token=True, add_eos_token=False, legacy=False,
                         model_max_length=4096, padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in TAIL_SPECIALS]})
    tok.pad_token = "<pad>"
    tok.chat_template = CHAT_TEMPLATE
    check_special_ids(tok, IDS, length=VOCAB_SIZE)
    return tok


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny LLaVA-1.5 checkpoint to ``out_dir``."""
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
                           patch_size=PATCH_SIZE, projection_dim=32, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5),
        text_config=dict(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=common.TEXT_HIDDEN,
                         intermediate_size=common.TEXT_INTERMEDIATE,
                         num_hidden_layers=common.TEXT_LAYERS,
                         num_attention_heads=common.TEXT_HEADS,
                         num_key_value_heads=common.TEXT_KV_HEADS, hidden_act="silu",
                         max_position_embeddings=4096, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=IDS["<s>"], eos_token_id=IDS["</s>"],
                         pad_token_id=IDS["<pad>"], tie_word_embeddings=False),
        image_token_index=IDS["<image>"],
        image_seq_length=IMAGE_SEQ_LENGTH,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    model = common.build_model(LlavaForConditionalGeneration, config, seed)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        do_convert_rgb=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                               patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    generation = dict(bos_token_id=IDS["<s>"], eos_token_id=IDS["</s>"], pad_token_id=IDS["<pad>"],
                      do_sample=False)
    return common.save_checkpoint(out_dir, model, processor, generation)
