"""Tiny Gemma 3: SigLIP ViT + multi-modal projector (average pool, RMSNorm, linear) + Gemma 3 decoder.

Real gemma-3-4b-it, shrunk: SigLIP at 56 px with 14-px patches (real: 896 px) -> 4x4 patch
features, average-pooled 2x2 into ``mm_tokens_per_image`` = 4 soft tokens (real: 64x64 -> 16x16 =
256). The decoder keeps Gemma's particulars: embeddings scaled by sqrt(hidden), ``(1 + w)``
RMSNorm (also on q/k and around attention and MLP: 4 norms per layer), GeGLU MLP with tanh-GELU,
sliding-window and full attention layers (here one of each, real 5:1), two RoPE bases (local
10k, global 1M), tied embeddings, ``final_logit_softcapping`` unset as in Gemma 3's configs.
The projector's input projection is drawn at random (transformers zero-initialises it, see
``init_projection``).

Tokenizer: as a real Gemma 3 checkpoint, a SentencePiece BPE model ``tokenizer.model`` (trained
here by the ``sentencepiece`` library with Gemma's settings: spaces become ``▁``, no prefix space,
byte fallback) and ``tokenizer.json``, transformers' own conversion of it (so both give the same ids
for the same text; llama.cpp's converter reads the former). ``<pad> <eos> <bos> <unk>`` sit at their
real ids 0..3, then ``<mask> [multimodal]``, the turn markers ``<start_of_turn>`` /
``<end_of_turn>`` (real: 105/106) and the newline runs (user-defined pieces: always whole), then the
byte pieces; ``<start_of_image>`` and ``<end_of_image>`` close the SentencePiece model and
``<image_soft_token>`` is an added token past it, as in the real one (255999, 256000, 262144).

Images: the processor replaces each ``<start_of_image>`` in the text by
``\\n\\n<start_of_image>`` + 4 x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``.
"""

from __future__ import annotations

from pathlib import Path

from vlm.atomic import write_bytes
from vlm.zoo import common
from vlm.zoo.tokenizer import check_special_ids, train_sentencepiece_bpe

VOCAB_SIZE = 896
HEAD_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>",
                 "<end_of_turn>")
# Runs of newlines are single tokens in Gemma's vocabulary (real: "\n" ×1..31 from id 107, right
# after the turn markers), never split or merged with neighbours; vLLM's Gemma 3 processor looks
# "\n" ×1..4 up by text when it writes the image block. Here ×1..4, after the turn markers.
NEWLINE_RUNS = tuple("\n" * k for k in range(1, 5))
TAIL_SPECIALS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
SENTENCEPIECE_FILE = "tokenizer.model"
BASE_VOCAB = VOCAB_SIZE - len(TAIL_SPECIALS)
IDS = {t: i for i, t in enumerate(HEAD_SPECIALS)} | {t: BASE_VOCAB + i for i, t in enumerate(TAIL_SPECIALS)}
IMAGE_SIZE = 56
PATCH_SIZE = 14
MM_TOKENS_PER_IMAGE = 4
TEXT_HEAD_DIM = 16

# google/gemma-3-*-it chat template: the system prompt is folded into the first user turn, the
# assistant's role is called "model", every turn ends with <end_of_turn> and a newline.
CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def sentencepiece_model() -> bytes:
    """The serialized ``tokenizer.model``: the trained BPE, then ``<start_of_image>`` and
    ``<end_of_image>`` as user-defined pieces at the end (the real model's last pieces are its image
    markers and reserved tokens; ``<image_soft_token>`` lies past it)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(train_sentencepiece_bpe(BASE_VOCAB, HEAD_SPECIALS[:4], HEAD_SPECIALS[4:] + NEWLINE_RUNS))
    for name in TAIL_SPECIALS[:-1]:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = name, 0.0, proto.SentencePiece.Type.USER_DEFINED
    return proto.SerializeToString()


def build_tokenizer():
    """GemmaTokenizer converted from ``sentencepiece_model()`` by transformers' own extractor (vocab
    in piece order, merges from the pieces, ranked by id: the order SentencePiece's scores give),
    with the image tokens named as Gemma 3's are."""
    import tempfile

    from tokenizers.models import BPE
    from transformers import AddedToken, GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    with tempfile.TemporaryDirectory() as spm_dir:
        path = Path(spm_dir) / SENTENCEPIECE_FILE
        path.write_bytes(sentencepiece_model())
        spec = SentencePieceExtractor(str(path)).extract(BPE)
    tok = GemmaTokenizer(vocab=spec["vocab"], merges=spec["merges"], model_max_length=131072, padding_side="left",
                         add_bos_token=True, add_eos_token=False,
                         boi_token="<start_of_image>", eoi_token="<end_of_image>",
                         image_token="<image_soft_token>")
    # the user-defined pieces are added tokens: matched whole in text, as SentencePiece does
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in HEAD_SPECIALS[5:] + TAIL_SPECIALS]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NEWLINE_RUNS])
    tok.chat_template = CHAT_TEMPLATE
    check_special_ids(tok, IDS, length=VOCAB_SIZE)
    return tok


def config_kwargs() -> dict:
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=common.TEXT_HIDDEN,
                intermediate_size=common.TEXT_INTERMEDIATE, num_hidden_layers=common.TEXT_LAYERS,
                num_attention_heads=common.TEXT_HEADS, num_key_value_heads=common.TEXT_KV_HEADS,
                head_dim=TEXT_HEAD_DIM, query_pre_attn_scalar=TEXT_HEAD_DIM,
                hidden_activation="gelu_pytorch_tanh", max_position_embeddings=4096, rms_norm_eps=1e-6,
                sliding_window=512, layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                final_logit_softcapping=None, attn_logit_softcapping=None,
                bos_token_id=IDS["<bos>"], eos_token_id=[IDS["<eos>"], IDS["<end_of_turn>"]],
                pad_token_id=IDS["<pad>"], tie_word_embeddings=True)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
                  patch_size=PATCH_SIZE, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                  vision_use_head=False)
    return dict(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
                boi_token_index=IDS["<start_of_image>"], eoi_token_index=IDS["<end_of_image>"],
                image_token_index=IDS["<image_soft_token>"], tie_word_embeddings=True)


def init_projection(model, seed: int) -> None:
    """Draw the projector's input projection from N(0, 0.02²): transformers initialises it to zeros,
    which zeroes every image feature and cuts the vision tower off from the loss; a trained
    checkpoint's is not zero."""
    import torch

    weight = model.model.multi_modal_projector.mm_input_projection_weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=gen) * 0.02)


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Gemma 3 checkpoint to ``out_dir``."""
    # top-level names: the module files differ between transformers 5.17 and 5.19
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor,
                              Gemma3Processor)

    model = common.build_model(Gemma3ForConditionalGeneration, Gemma3Config(**config_kwargs()), seed)
    init_projection(model, seed)
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_resize=True, do_rescale=True,
        do_normalize=True, do_convert_rgb=True, do_pan_and_scan=False, resample=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=build_tokenizer(),
                                chat_template=CHAT_TEMPLATE, image_seq_length=MM_TOKENS_PER_IMAGE)
    generation = dict(bos_token_id=IDS["<bos>"], pad_token_id=IDS["<pad>"],
                      eos_token_id=[IDS["<eos>"], IDS["<end_of_turn>"]], do_sample=False)
    out = common.save_checkpoint(out_dir, model, processor, generation)
    # transformers' GemmaTokenizer saves tokenizer.json only; the hub's checkpoints carry the model too
    write_bytes(out / SENTENCEPIECE_FILE, sentencepiece_model())
    return out
