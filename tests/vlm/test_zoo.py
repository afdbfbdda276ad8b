"""The tiny-model zoo: standard HF layout, real tokenizers, deterministic weights, small files."""

from __future__ import annotations

import json

import pytest

from vlm.errors import VlmError
from vlm.zoo import VARIANTS, build_tiny

# What the tokenizer must spell, per variant: the image placeholder and the chat markers.
MARKERS = {
    "qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant\n"),
    "qwen2_5_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant\n"),
    "llava": ("USER: <image>\n", "ASSISTANT:"),
    "pixtral": ("[INST][IMG]", "[/INST]"),
    "mllama": ("<|start_header_id|>user<|end_header_id|>\n\n<|image|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen3_vl": ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant\n"),
    "gemma3": ("<bos><start_of_turn>user\n<start_of_image>", "<start_of_turn>model\n"),
    "mistral3": ("[/SYSTEM_PROMPT][INST][IMG]", "[/INST]"),
}
# The token the model config names as its image token (Gemma 3's text holds <start_of_image>; the
# processor expands it around <image_soft_token>s, the id in the config).
IMAGE_TOKEN = {"qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "llava": "<image>",
               "pixtral": "[IMG]", "mllama": "<|image|>", "qwen3_vl": "<|image_pad|>",
               "gemma3": "<image_soft_token>", "mistral3": "[IMG]"}
MODEL_TYPE = {"pixtral": "llava"}  # variants whose model_type is not their name
EXPECTED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "processor_config.json", "chat_template.jinja")


def test_every_variant_has_expectations_here():
    assert set(MARKERS) == set(IMAGE_TOKEN) == set(VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_standard_layout_and_size(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    names = {p.name for p in path.iterdir()}
    assert set(EXPECTED_FILES) <= names, sorted(names)
    assert (path / "model.safetensors").stat().st_size < 3 * 1024 * 1024
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE.get(variant, variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokenizer_and_template(tiny_checkpoint, variant):
    from transformers import AutoConfig, AutoProcessor

    path = tiny_checkpoint(variant)
    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    tok = processor.tokenizer
    text_vocab = config.get_text_config().vocab_size
    # Every id the model can emit decodes to a token (no silent empty strings past the tokenizer).
    assert len(tok) >= text_vocab
    assert all(t is not None for t in tok.convert_ids_to_tokens(list(range(text_vocab))))
    # The image token sits at the id the model config names.
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN[variant]) == image_id
    # Generation stops on the template's end-of-turn token.
    gen = json.loads((path / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.eos_token_id in eos
    # The family's chat template renders the image placeholder and the turn markers.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for marker in MARKERS[variant]:
        assert marker in text, (marker, text)
    # Captions tokenize into words, not bytes: the corpus was English about shapes and colours.
    caption_ids = tok("a small red circle in the top left corner", add_special_tokens=False).input_ids
    assert len(caption_ids) <= 10, tok.convert_ids_to_tokens(caption_ids)
    assert tok.decode(caption_ids).strip() == "a small red circle in the top left corner"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_seed_same_bytes(tiny_checkpoint, tmp_path, variant):
    first = tiny_checkpoint(variant)
    again = build_tiny(variant, tmp_path / "again", seed=0)
    for f in sorted(first.iterdir()):
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name
    other = build_tiny(variant, tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_unknown_variant_names_the_known_ones(tmp_path):
    with pytest.raises(VlmError, match=", ".join(VARIANTS)):
        build_tiny("gpt2", tmp_path)


HOSTILE_TEXTS = ["Hello  world\t tab  ", "émoji 🤖 ünïcödé 日本語", "a\n\n\n\n\nb\n\n\n c", "12345 67.8",
                 "   leading", "trailing   ", "<0x41> <mask>x", "<start_of_turn>user\nDescribe<end_of_turn>\n",
                 "x<start_of_image>y<end_of_image>z", "a small red circle in the top left corner"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sentencepiece_model_and_tokenizer_json_agree(tiny_checkpoint, variant):
    """Where a zoo checkpoint ships tokenizer.model (Gemma 3, as the hub's; llama.cpp's converter
    reads it), transformers' tokenizer (tokenizer.json) gives the same ids for the same text: the
    corpus and text with runs of spaces/newlines, tabs, unknown characters, digits, markers."""
    import sentencepiece
    from transformers import AutoTokenizer

    from vlm.zoo.corpus import corpus_lines

    path = tiny_checkpoint(variant)
    if not (path / "tokenizer.model").is_file():
        pytest.skip(f"{variant}: its real checkpoints ship tokenizer.json only")
    spm = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(path)
    assert spm.get_piece_size() <= len(tok)
    assert [spm.id_to_piece(i) for i in range(spm.get_piece_size())] == tok.convert_ids_to_tokens(
        list(range(spm.get_piece_size())))
    for text in list(corpus_lines()) + HOSTILE_TEXTS:
        assert spm.encode(text) == tok.encode(text, add_special_tokens=False), text
