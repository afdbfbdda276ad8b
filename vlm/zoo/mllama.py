"""Tiny Llama-3.2-Vision (Mllama): tiled ViT (local + gated global encoder) + projector feeding
gated cross-attention layers interleaved in a Llama 3 decoder.

Real Llama-3.2-11B-Vision-Instruct, shrunk: tiles of 28 px (real: 560) with 14-px patches, at most
2 tiles per image (aspect ratios 1x1, 1x2, 2x1); vision hidden 32 with features from intermediate
layer 0 concatenated to the final state, so ``vision_output_dim = 32 x (1 + 1) = 64`` (this must
hold or the projector's shape is wrong). Text: 3 layers, layer 1 a cross-attention layer (real: 40
layers, every 5th from 3), Llama 3 RoPE scaling, untied embeddings.

Gates: transformers initialises the cross-attention and tile-embedding gates to 0 (tanh(0) = 0),
which cuts the vision tower off from the loss (zero gradient). A trained checkpoint has non-zero
gates, so the builder sets every gate to 0.5 after the seeded init: images then change the logits
and every component receives gradient, as in the real model.

Tokenizer: byte-level BPE after Llama 3's split regex, then the 256 Llama 3 special tokens
(``<|begin_of_text|>`` = base + 0, ``<|eot_id|>`` = base + 9, ...), then ``<|image|>`` at
``vocab_size`` (real: 128256), an input-only id (the embedding has vocab_size + 8 rows).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlm.zoo import common
from vlm.zoo.tokenizer import byte_level_backend, check_special_ids, train_bpe

BASE_VOCAB = 640
_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
          "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
          "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_SPECIALS = _NAMED + tuple(f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(_NAMED)))
VOCAB_SIZE = BASE_VOCAB + len(LLAMA3_SPECIALS)  # 896: the text model's vocab (lm_head rows)
IMAGE_TOKEN = "<|image|>"
IDS = {tok: BASE_VOCAB + i for i, tok in enumerate(_NAMED)} | {IMAGE_TOKEN: VOCAB_SIZE}
TILE_SIZE = 28
PATCH_SIZE = 14
MAX_TILES = 2
GATE_VALUE = 0.5

# Llama-3.2-11B-Vision-Instruct chat template (tool-calling branches left out).
CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content']|trim %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text']|trim %}
    {%- endif %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- if message['content'] is not string %}
        {%- for content in message['content'] %}
            {%- if content['type'] == 'image' %}
                {%- set image_ns.has_images = true %}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endfor %}
{%- if not (image_ns.has_images and not system_message) %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for content in message['content'] %}
            {%- if content['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- elif content['type'] == 'text' %}
                {{- content['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""


def build_tokenizer():
    """TokenizersBackend over a Llama 3 style byte-level BPE; adds <|begin_of_text|>."""
    from transformers import TokenizersBackend

    vocab, merges = train_bpe("llama3", BASE_VOCAB)
    backend = byte_level_backend("llama3", vocab, merges, specials=LLAMA3_SPECIALS + (IMAGE_TOKEN,),
                                 bos="<|begin_of_text|>")
    tok = TokenizersBackend(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                            eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                            model_max_length=131072, clean_up_tokenization_spaces=True)
    tok.chat_template = CHAT_TEMPLATE
    check_special_ids(tok, IDS, length=VOCAB_SIZE + 1)
    return tok


def open_gates(model: torch.nn.Module, value: float = GATE_VALUE) -> None:
    """Set the scalar gates (cross-attention, tile/position embeddings, global layers) to ``value``."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate",
                                           "cross_attn_mlp_gate"):
                param.fill_(value)


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Llama-3.2-Vision checkpoint to ``out_dir``."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    vision_hidden, indices = 32, [0]
    config = MllamaConfig(
        vision_config=dict(hidden_size=vision_hidden, attention_heads=2, intermediate_size=128,
                           num_hidden_layers=2, num_global_layers=1,
                           intermediate_layers_indices=indices,
                           vision_output_dim=vision_hidden * (len(indices) + 1),
                           image_size=TILE_SIZE, patch_size=PATCH_SIZE, max_num_tiles=MAX_TILES,
                           norm_eps=1e-5, hidden_act="gelu",
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=common.TEXT_HIDDEN,
                         intermediate_size=common.TEXT_INTERMEDIATE, num_hidden_layers=3,
                         cross_attention_layers=[1], num_attention_heads=common.TEXT_HEADS,
                         num_key_value_heads=common.TEXT_KV_HEADS, hidden_act="silu",
                         max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         bos_token_id=IDS["<|begin_of_text|>"],
                         eos_token_id=[IDS["<|end_of_text|>"], IDS["<|eom_id|>"], IDS["<|eot_id|>"]],
                         pad_token_id=IDS["<|finetune_right_pad_id|>"], tie_word_embeddings=False),
        image_token_index=IDS[IMAGE_TOKEN],
        tie_word_embeddings=False,
    )
    model = common.build_model(MllamaForConditionalGeneration, config, seed)
    open_gates(model)
    image_processor = MllamaImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, max_image_tiles=MAX_TILES, do_resize=True,
        do_rescale=True, do_normalize=True, do_pad=True, do_convert_rgb=True, resample=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                                chat_template=CHAT_TEMPLATE)
    generation = dict(bos_token_id=IDS["<|begin_of_text|>"], pad_token_id=IDS["<|finetune_right_pad_id|>"],
                      eos_token_id=[IDS["<|end_of_text|>"], IDS["<|eom_id|>"], IDS["<|eot_id|>"]],
                      do_sample=False)
    return common.save_checkpoint(out_dir, model, processor, generation)
