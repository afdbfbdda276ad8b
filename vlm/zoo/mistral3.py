"""Tiny Mistral-Small-3.1 (Mistral3): Pixtral ViT + projector with a 2x2 patch merger + Mistral decoder.

Real Mistral-Small-3.1-24B-Instruct-2503, shrunk: the Pixtral tower (2-D RoPE, any resolution,
14-px patches, images up to ``longest_edge`` 112 px here, 1540 real) feeds the multi-modal
projector: RMSNorm, then the patch merger (each 2x2 block of patch features concatenated and
projected back, ``spatial_merge_size=2``), then a 2-layer GELU MLP without biases. So a 112x112
image is 8x8 patches -> 4x4 merged tokens: per row ``[IMG]`` x 4 then ``[IMG_BREAK]``, the last row
ending in ``[IMG_END]`` (20 tokens). Untied embeddings, GQA, SwiGLU, RMSNorm, RoPE base 1e9.

Tokenizer: the Tekken-style byte-level BPE of the tiny Pixtral with the same 20 control tokens at
their real ids (``[IMG]`` = 10, ``[IMG_BREAK]`` = 12, ``[IMG_END]`` = 13, ``[SYSTEM_PROMPT]`` = 17 ...).
"""

from __future__ import annotations

from pathlib import Path

from vlm.zoo import common
from vlm.zoo import pixtral as px

VOCAB_SIZE = px.VOCAB_SIZE
IDS = px.IDS
PATCH_SIZE = 14
LONGEST_EDGE = 112
SPATIAL_MERGE = 2

# Mistral-Small-3.1-24B-Instruct-2503's chat template: a system prompt (a default one when the
# conversation has none) in [SYSTEM_PROMPT] tags, user turns in [INST] ... [/INST], images as [IMG],
# assistant turns closed by </s>.
DEFAULT_SYSTEM_MESSAGE = ("You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, "
                          "a French startup headquartered in Paris.")
CHAT_TEMPLATE = ('{%- set default_system_message = "' + DEFAULT_SYSTEM_MESSAGE + '" %}\n' + r"""

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content'] %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text'] %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' }}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] in ['image', 'image_url'] %}
                    {{- '[IMG]' }}
                {%- else %}
                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'system' %}
        {%- if message['content'] is string %}
            {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
        {%- else %}
            {{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] + eos_token }}
        {%- else %}
            {{- message['content'][0]['text'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}""")


def build_tokenizer():
    tok = px.build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def config_kwargs() -> dict:
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, image_size=LONGEST_EDGE, patch_size=PATCH_SIZE,
                  hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text = dict(model_type="mistral", vocab_size=VOCAB_SIZE, hidden_size=common.TEXT_HIDDEN,
                intermediate_size=common.TEXT_INTERMEDIATE, num_hidden_layers=common.TEXT_LAYERS,
                num_attention_heads=common.TEXT_HEADS, num_key_value_heads=common.TEXT_KV_HEADS,
                head_dim=common.TEXT_HIDDEN // common.TEXT_HEADS, hidden_act="silu",
                max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
                bos_token_id=IDS["<s>"], eos_token_id=IDS["</s>"], pad_token_id=IDS["<pad>"],
                tie_word_embeddings=False)
    return dict(vision_config=vision, text_config=text, image_token_index=IDS["[IMG]"],
                projector_hidden_act="gelu", vision_feature_layer=-1, multimodal_projector_bias=False,
                spatial_merge_size=SPATIAL_MERGE, tie_word_embeddings=False)


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Mistral-Small-3.1 checkpoint to ``out_dir``."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralProcessor
    from transformers.models.pixtral.image_processing_pixtral import PixtralImageProcessor

    model = common.build_model(Mistral3ForConditionalGeneration, Mistral3Config(**config_kwargs()), seed)
    image_processor = PixtralImageProcessor(
        size={"longest_edge": LONGEST_EDGE}, patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE},
        do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                                 patch_size=PATCH_SIZE, spatial_merge_size=SPATIAL_MERGE,
                                 chat_template=CHAT_TEMPLATE)
    generation = dict(bos_token_id=IDS["<s>"], eos_token_id=IDS["</s>"], pad_token_id=IDS["<pad>"],
                      do_sample=False)
    return common.save_checkpoint(out_dir, model, processor, generation)
