"""Before training: plan every sample once, report what cannot be used, keep the lengths.

:func:`prepare_samples` runs :meth:`VisionChatCollator.plan` over the conversations (text
tokenization + image headers, no pixel decoding), sends samples that are too long or have nothing
to train on to the :class:`RejectLog` (``on_error="skip"``) or raises (``"raise"``), and returns the
kept conversations with their token lengths for the length-grouped ``SeededSampler``. Doing this in the
main process means DataLoader workers never drop anything behind the report's back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from vlm.data_formats.conversation import Conversation
from vlm.data_formats.reader import check_on_error
from vlm.data_formats.rejects import RejectLog
from vlm.errors import DataError


@dataclass
class PreparedSamples:
    conversations: list[Conversation]
    lengths: list[int]                    # tokens per kept sample (after text-only truncation)
    truncated: int = 0                    # samples cut in text only
    stats: dict = field(default_factory=dict)


def prepare_samples(conversations: Iterable[Conversation], collator, *, on_error: str = "raise",
                    rejects: RejectLog | None = None) -> PreparedSamples:
    check_on_error(on_error, rejects)
    kept, lengths, truncated = [], [], 0
    text_tokens = image_tokens = 0
    for conv in conversations:
        try:
            plan = collator.plan(conv)
        except DataError as e:
            if on_error == "raise":
                raise
            rejects.add(e)
            continue
        kept.append(conv)
        lengths.append(plan.keep)
        truncated += plan.truncated
        text_tokens += plan.text_tokens
        image_tokens += plan.image_tokens
    return PreparedSamples(kept, lengths, truncated,
                           {"samples": len(kept), "text_tokens": text_tokens,
                            "image_tokens": image_tokens, "truncated": truncated})
