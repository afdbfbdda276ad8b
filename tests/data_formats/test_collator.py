"""The collator on every tiny zoo family: exact tokens and labels against hand-written expectations,
then a real forward pass with the batch (the model would raise on any image-token mismatch)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm.data_formats import problems
from vlm.data_formats.collator import IGNORE_INDEX, VisionChatCollator
from vlm.data_formats.conversation import Conversation, ImageRef, ImageSlot, Turn
from vlm.data_formats.resolution import Resolution, apply_resolution, load_resolution, save_resolution
from vlm.errors import DataError
from vlm.zoo import VARIANTS

ZOO_VARIANTS = tuple(VARIANTS)

N, Y = False, True   # not trained / trained

# Hand-written: the token strings of one image (64x64) + "Describe the image." -> "a red circle",
# each with whether it carries a label. Image counts: Qwen2-VL 64px -> 56x56 -> 4x4 patches / 2x2
# merge = 4; LLaVA 42px crop / 14 = 3x3 = 9; Pixtral 64px / 16 = 4 rows of 4 + a break/end = 20;
# Mllama one <|image|> (pixels go through cross-attention).
QWEN = ([("<|im_start|>", N), ("system", N), ("Ċ", N), ("You", N), ("Ġare", N), ("Ġa", N),
         ("Ġhelpful", N), ("Ġassistant", N), (".", N), ("<|im_end|>", N), ("Ċ", N),
         ("<|im_start|>", N), ("user", N), ("Ċ", N), ("<|vision_start|>", N)]
        + [("<|image_pad|>", N)] * 4
        + [("<|vision_end|>", N), ("Describe", N), ("Ġthe", N), ("Ġimage", N), (".", N),
           ("<|im_end|>", N), ("Ċ", N), ("<|im_start|>", N), ("assistant", N), ("Ċ", N),
           ("a", Y), ("Ġred", Y), ("Ġcircle", Y), ("<|im_end|>", Y), ("Ċ", N)])
EXPECTED = {
    "qwen2_vl": QWEN,
    "qwen2_5_vl": QWEN,
    "llava": [("<s>", N), ("▁USER:", N), ("▁", N)] + [("<image>", N)] * 9
             + [("\n", N), ("Describe", N), ("▁the", N), ("▁image.", N), ("▁ASSISTANT:", N),
                ("▁a", Y), ("▁red", Y), ("▁circle", Y), ("</s>", Y), ("▁", N)],
    "pixtral": [("<s>", N), ("[INST]", N)]
               + ([("[IMG]", N)] * 4 + [("[IMG_BREAK]", N)]) * 3 + [("[IMG]", N)] * 4 + [("[IMG_END]", N)]
               + [("Describe", N), ("Ġthe", N), ("Ġimage", N), (".", N), ("[/INST]", N),
                  ("a", Y), ("Ġred", Y), ("Ġcircle", Y), ("</s>", Y)],
    "mllama": [("<|begin_of_text|>", N), ("<|start_header_id|>", N), ("user", N), ("<|end_header_id|>", N),
               ("Ċ", N), ("Ċ", N), ("<|image|>", N), ("Describe", N), ("Ġthe", N), ("Ġimage", N),
               (".", N), ("<|eot_id|>", N), ("<|start_header_id|>", N), ("assistant", N),
               ("<|end_header_id|>", N), ("Ċ", N), ("Ċ", N), ("a", Y), ("Ġred", Y), ("Ġcircle", Y),
               ("<|eot_id|>", Y)],
}
EXPECTED["qwen3_vl"] = QWEN[11:]   # no default system prompt; 64px -> 4x4 patches of 16 / 2x2 = 4
# Gemma 3: the processor writes \n\n before <start_of_image> (with the turn's \n one token "\n\n\n":
# newline runs are single tokens in Gemma's vocabulary) and 4 soft tokens, <end_of_image>, \n\n after
# it; the assistant is "model".
EXPECTED["gemma3"] = ([("<bos>", N), ("<start_of_turn>", N), ("user", N), ("\n\n\n", N),
                       ("<start_of_image>", N)] + [("<image_soft_token>", N)] * 4
                      + [("<end_of_image>", N), ("\n\n", N), ("Describe", N), ("▁the", N), ("▁image", N),
                         (".", N), ("<end_of_turn>", N), ("\n", N), ("<start_of_turn>", N), ("m", N), ("o", N),
                         ("del", N), ("\n", N), ("a", Y), ("▁red", Y), ("▁circle", Y),
                         ("<end_of_turn>", Y), ("\n", N)])
# Mistral-Small-3.1: the default system prompt (SYSTEM below: its tokens, none trained); 64px is
# resized up to 84 px (a multiple of patch 14 x merge 2) -> 6x6 patches -> 3 rows of 3 merged
# [IMG], [IMG_BREAK] / [IMG_END] closing the rows.
SYSTEM = ("SYSTEM", N)
EXPECTED["mistral3"] = ([("<s>", N), ("[SYSTEM_PROMPT]", N), SYSTEM, ("[/SYSTEM_PROMPT]", N), ("[INST]", N)]
                        + ([("[IMG]", N)] * 3 + [("[IMG_BREAK]", N)]) * 2 + [("[IMG]", N)] * 3
                        + [("[IMG_END]", N), ("Describe", N), ("Ġthe", N), ("Ġimage", N), (".", N),
                           ("[/INST]", N), ("a", Y), ("Ġred", Y), ("Ġcircle", Y), ("</s>", Y)])
FORWARD_KEYS = {
    "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "qwen2_5_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "llava": {"pixel_values"},
    "pixtral": {"pixel_values", "image_sizes"},
    "mllama": {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"},
    "qwen3_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "gemma3": {"pixel_values", "token_type_ids"},   # token_type_ids: bidirectional attention on images
    "mistral3": {"pixel_values", "image_sizes"},
}


def _expected(variant, tokenizer):
    """(tokens, trained) of EXPECTED[variant], the SYSTEM entry spelled out as its tokens."""
    from vlm.zoo.mistral3 import DEFAULT_SYSTEM_MESSAGE

    out = []
    for tok, trained in EXPECTED[variant]:
        if (tok, trained) == SYSTEM:
            out += [(t, N) for t in tokenizer.tokenize(DEFAULT_SYSTEM_MESSAGE)]
        else:
            out.append((tok, trained))
    return out


def test_every_zoo_variant_has_expectations():
    assert set(EXPECTED) == set(FORWARD_KEYS) == set(ZOO_VARIANTS)


def _conv(image, answer="a red circle", extra_turns=()):
    turns = [Turn("user", [ImageSlot(0), "Describe the image."]), Turn("assistant", [answer]), *extra_turns]
    return Conversation(turns, [ImageRef("pil", image)], record_id="t", source="mem", index=0)


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (64, 64), (200, 30, 30))


def _setup(tiny_checkpoint, variant, **kwargs):
    from transformers import AutoProcessor

    from vlm.families import family_for_config
    from vlm.load import load_config

    path = tiny_checkpoint(variant)
    processor = AutoProcessor.from_pretrained(str(path))
    return path, VisionChatCollator(processor, family_for_config(load_config(path)), **kwargs)


@pytest.mark.parametrize("variant", ZOO_VARIANTS)
def test_exact_tokens_labels_and_forward(tiny_checkpoint, image, variant):
    from transformers import AutoModelForImageTextToText

    path, collator = _setup(tiny_checkpoint, variant, pad_to_multiple_of=8)
    short = Conversation([Turn("user", ["Hi"]), Turn("assistant", ["a red circle"])], [],
                         record_id="s", source="mem", index=1)
    batch = collator([_conv(image), short]) if variant != "mllama" else collator([_conv(image)])
    tokens, trained = zip(*_expected(variant, collator.tokenizer))
    ids = collator.tokenizer.convert_tokens_to_ids(list(tokens))
    n = len(ids)
    assert batch["input_ids"][0, :n].tolist() == ids
    assert batch["labels"][0, :n].tolist() == [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    length = batch["input_ids"].shape[1]
    assert length % 8 == 0 and length >= n
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert batch["attention_mask"][0, :n].all()
    assert FORWARD_KEYS[variant] <= set(batch)
    # the processor's own chat path gives the same text (LLaVA: plus the </s> its template omits)
    ref = collator.processor.apply_chat_template(_conv(image).to_messages(), tokenize=False)
    if variant == "llava":
        ref = ref.replace("a red circle", "a red circle</s>")
    assert ref == collator.plan(_conv(image)).text
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_label_policies_multi_turn_two_images(tiny_checkpoint, image):
    _, collator = _setup(tiny_checkpoint, "qwen2_vl", pad_to_multiple_of=1)
    conv = Conversation(
        [Turn("user", [ImageSlot(0), "Describe the image."]), Turn("assistant", ["a red circle"]),
         Turn("user", [ImageSlot(1), "And?"]), Turn("assistant", ["a red circle"])],
        [ImageRef("pil", image), ImageRef("pil", image.resize((28, 28)))], source="mem", index=0)
    answer = collator.tokenizer.convert_tokens_to_ids(["a", "Ġred", "Ġcircle", "<|im_end|>"])

    def trained(train_on):
        collator.train_on = train_on
        b = collator([conv])
        return [t for t, lab in zip(b["input_ids"][0].tolist(), b["labels"][0].tolist()) if lab != IGNORE_INDEX]

    assert trained("assistant") == answer * 2
    assert trained("last_assistant") == answer
    everything = trained("all")
    b = collator([conv])
    counts = collator.plan(conv).image_counts
    assert counts == [4, 4]   # 28x28 is raised to min_pixels 3136 = 56x56 -> 2x2 merged tokens
    assert collator.image_token_id not in everything
    assert len(everything) == b["input_ids"].shape[1] - sum(counts)
    assert (b["input_ids"][0] == collator.image_token_id).sum().item() == sum(counts)


def test_truncation_never_cuts_an_image(tiny_checkpoint, image):
    _, collator = _setup(tiny_checkpoint, "qwen2_vl", pad_to_multiple_of=1, max_length=30)
    long = _conv(image, answer="a red circle " * 10)
    plan = collator.plan(long)
    assert plan.truncated and plan.keep == 30
    b = collator([long])
    assert b["input_ids"].shape[1] == 30 and (b["input_ids"][0] == collator.image_token_id).sum() == 4
    assert (b["labels"][0] != IGNORE_INDEX).sum() == plan.trainable_tokens > 0
    collator.max_length = 18   # the image block ends at token 19: text-only truncation cannot fit
    with pytest.raises(DataError) as e:
        collator.plan(long)
    assert e.value.code == problems.TOO_LONG and "record 0" in str(e.value)
    collator.max_length, collator.overlong = 30, "drop"
    with pytest.raises(DataError, match="overlong='drop'"):
        collator.plan(long)


def test_resolution_changes_token_count_and_round_trips(tiny_checkpoint, image, tmp_path):
    _, collator = _setup(tiny_checkpoint, "qwen2_vl", resolution={"min_pixels": 28 * 28, "max_pixels": 28 * 28})
    assert collator.plan(_conv(image)).image_counts == [1]
    assert collator([_conv(image)])["image_grid_thw"].tolist() == [[1, 2, 2]]
    save_resolution(tmp_path, Resolution(min_pixels=784, max_pixels=784))
    assert load_resolution(tmp_path) == Resolution(min_pixels=784, max_pixels=784)
    with pytest.raises(Exception, match="longest_edge"):
        apply_resolution(collator.processor, {"longest_edge": 32})
