"""Span planning: the one-pass marker method gives exactly the labels of prefix-by-prefix rendering
(the slow, obviously-right method) on every zoo family, for multi-turn conversations with and
without a system prompt."""

from __future__ import annotations

import random

import pytest

from vlm.data_formats import chat_render
from vlm.data_formats.collator import VisionChatCollator
from vlm.data_formats.conversation import Conversation, Turn
from vlm.zoo import VARIANTS

WORDS = ["red", "blue", " circle", "a", "\n", "ok.", "  big", "Yes", "é", "12"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_marker_spans_equal_prefix_spans(tiny_checkpoint, variant):
    from transformers import AutoProcessor

    from vlm.families import family_for_config
    from vlm.load import load_config

    path = tiny_checkpoint(variant)
    processor = AutoProcessor.from_pretrained(str(path))
    collator = VisionChatCollator(processor, family_for_config(load_config(path)))
    rng = random.Random(0)
    for trial in range(25):
        turns = [Turn("system", ["Be brief."])] if trial % 2 else []
        for _ in range(rng.randint(1, 4)):
            turns.append(Turn("user", ["q" + "".join(rng.choice(WORDS) for _ in range(3))]))
            reply = "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))).strip() or "x"
            turns.append(Turn("assistant", [reply]))
        conv = Conversation(turns, [], source="mem", index=trial)
        messages = chat_render.chat_messages(conv, collator.family, collator.append_end_of_turn)
        full = chat_render.render(processor, messages)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        marked = chat_render._marked_spans(processor, messages, replies, full, collator.family.end_of_turn,
                                           collator.generation_prompt)
        assert marked is not None, "the template reacted to the markers: planning would be quadratic"
        prefix = chat_render._prefix_spans(processor, messages, replies, full, conv)
        offsets = collator.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert chat_render.token_flags(offsets, marked) == chat_render.token_flags(offsets, prefix), full
