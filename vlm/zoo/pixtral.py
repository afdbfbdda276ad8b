"""Tiny Pixtral in the HF LLaVA layout (mistral-community/pixtral-12b): Pixtral ViT (2-D RoPE,
any resolution, 16-px patches) + 2-layer GELU projector + Mistral decoder.

Images keep their aspect ratio up to ``longest_edge`` 64 px (real: 1024), so one image is at most
4x4 patches: per row ``[IMG]`` x cols then ``[IMG_BREAK]``, the last row ending in ``[IMG_END]``
(a 64x48 image -> 3 rows x 4 = 12 ``[IMG]`` + 2 breaks + 1 end). All patch features are used
(``vision_feature_layer=-1``, strategy "full").

Tokenizer: byte-level BPE after Mistral's Tekken split regex, saved as a plain ``tokenizer.json``
(like the real checkpoint). The first 20 control tokens sit at their real ids: ``<unk>``=0,
``<s>``=1, ``</s>``=2, ``[INST]``=3, ``[/INST]``=4, ``[IMG]``=10, ``<pad>``=11, ``[IMG_BREAK]``=12,
``[IMG_END]``=13 ...
"""

from __future__ import annotations

from pathlib import Path

from vlm.zoo import common
from vlm.zoo.tokenizer import byte_level_backend, check_special_ids, train_bpe

VOCAB_SIZE = 896  # tokenizer length == model vocab
# Tekken's control tokens 0..19, in their real order.
CONTROL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)
IDS = {tok: i for i, tok in enumerate(CONTROL_TOKENS)}
PATCH_SIZE = 16
LONGEST_EDGE = 64

# mistral-community/pixtral-12b chat template (system message folded into the last user turn).
CHAT_TEMPLATE = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\n\n" }}
        {%- else %}
            {{- "[INST]" }}
        {%- endif %}
        {%- if message["content"] is not string %}
            {%- for chunk in message["content"] %}
                {%- if chunk["type"] == "text" %}
                    {{- chunk["text"] }}
                {%- elif chunk["type"] == "image" %}
                    {{- "[IMG]" }}
                {%- else %}
                    {{- raise_exception("Unrecognized content type!") }}
                {%- endif %}
            {%- endfor %}
        {%- else %}
            {{- message["content"] }}
        {%- endif %}
        {{- "[/INST]" }}
    {%- elif message["role"] == "assistant" %}
        {%- if message["content"] is not string %}
            {%- for chunk in message["content"] %}
                {%- if chunk["type"] == "text" %}
                    {{- chunk["text"] }}
                {%- endif %}
            {%- endfor %}
        {%- else %}
            {{- message["content"] }}
        {%- endif %}
        {{- eos_token }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""


def build_tokenizer():
    """TokenizersBackend (PreTrainedTokenizerFast) over a Tekken-style byte-level BPE; adds <s>."""
    from transformers import TokenizersBackend

    vocab, merges = train_bpe("tekken", VOCAB_SIZE, CONTROL_TOKENS)
    backend = byte_level_backend("tekken", vocab, merges, specials=CONTROL_TOKENS, bos="<s>")
    tok = TokenizersBackend(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>", model_max_length=131072,
                            clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    check_special_ids(tok, IDS, length=VOCAB_SIZE)
    return tok


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Pixtral (llava layout) checkpoint to ``out_dir``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PixtralProcessor
    from transformers.models.pixtral.image_processing_pixtral import PixtralImageProcessor

    config = LlavaConfig(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                           image_size=LONGEST_EDGE, patch_size=PATCH_SIZE, hidden_act="silu",
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        text_config=dict(model_type="mistral", vocab_size=VOCAB_SIZE, hidden_size=common.TEXT_HIDDEN,
                         intermediate_size=common.TEXT_INTERMEDIATE,
                         num_hidden_layers=common.TEXT_LAYERS,
                         num_attention_heads=common.TEXT_HEADS,
                         num_key_value_heads=common.TEXT_KV_HEADS,
                         head_dim=common.TEXT_HIDDEN // common.TEXT_HEADS, hidden_act="silu",
                         max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
                         bos_token_id=IDS["<s>"], eos_token_id=IDS["</s>"],
                         pad_token_id=IDS["<pad>"], tie_word_embeddings=False),
        image_token_index=IDS["[IMG]"],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = common.build_model(LlavaForConditionalGeneration, config, seed)
    image_processor = PixtralImageProcessor(
        size={"longest_edge": LONGEST_EDGE}, patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE},
        do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                                 patch_size=PATCH_SIZE, spatial_merge_size=1,
                                 chat_template=CHAT_TEMPLATE)
    generation = dict(bos_token_id=IDS["<s>"], eos_token_id=IDS["</s>"], pad_token_id=IDS["<pad>"],
                      do_sample=False)
    return common.save_checkpoint(out_dir, model, processor, generation)
