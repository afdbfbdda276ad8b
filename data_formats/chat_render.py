"""Render a conversation with the processor's chat template and find which characters train.

Spans come from rendering prefixes, not from searching the text: for assistant turn *k*,
``render(turns[:k], add_generation_prompt=True)`` ends where the answer starts and
``render(turns[:k+1])`` ends where the turn ends (its end-of-turn token included, trailing
whitespace excluded). Both must be prefixes of the full rendering; a template for which that
fails is reported instead of guessed around.
"""

from __future__ import annotations

from vlm.data_formats.conversation import Conversation
from vlm.errors import ConfigError, VlmError

TRAIN_ON = ("assistant", "last_assistant", "all")


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def trainable_char_spans(processor, conv: Conversation, train_on: str = "assistant") -> tuple[str, list[tuple[int, int]]]:
    """``(full_text, [(start, end), ...])``: character spans whose tokens get labels."""
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    messages = conv.to_messages()
    full = render(processor, messages)
    if train_on == "all":
        return full, [(0, len(full))]
    turns = conv.assistant_turn_indices()
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for k in turns:
        head = render(processor, messages[:k], add_generation_prompt=True)
        upto = render(processor, messages[:k + 1])
        if not (full.startswith(upto) and upto.startswith(head)):
            raise VlmError(f"the chat template does not render conversations prefix by prefix "
                           f"(turn {k} of record {conv.index} in {conv.source}); labels cannot be "
                           "placed reliably with this template")
        end = len(upto.rstrip())
        if end > len(head):
            spans.append((len(head), end))
    return full, spans


def token_flags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (character offsets), does it overlap a trainable span?"""
    flags = []
    for start, end in offsets:
        flags.append(end > start and any(start < e and end > s for s, e in spans))
    return flags
