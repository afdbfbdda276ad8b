"""Reader for LLaVA / ShareGPT records.

``{"id": ..., "image": str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}``

Each ``<image>`` in a value marks where the next image of ``image`` (or ``images``) goes, in order.
LLaMA-Factory's variant (``images`` list, a top-level ``system`` column, ``role``/``content`` tags)
reads the same way (see :mod:`.record_fields`).
"""

from __future__ import annotations

from typing import Any

from vlm.data_formats import problems
from vlm.data_formats.conversation import Conversation, ImageSlot, Part, Turn
from vlm.data_formats.record_fields import (record_images, record_system, refuse_video_fields,
                                            refuse_video_text)
from vlm.errors import DataError

PLACEHOLDER = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "model": "assistant", "system": "system"}


def split_placeholders(text: str, next_image: int) -> list[Part]:
    """``"a<image>b"`` -> ``["a", ImageSlot(next_image), "b"]`` (empty strings dropped)."""
    parts: list[Part] = []
    pieces = text.split(PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append(ImageSlot(next_image, placeholder=True))
            next_image += 1
        if piece:
            parts.append(piece)
    return parts


def parse_sharegpt(record: dict[str, Any]) -> Conversation:
    """One ShareGPT record -> :class:`Conversation`; raises :class:`DataError` (no location yet)."""
    turns_raw = record.get("conversations")
    if not isinstance(turns_raw, list):
        raise DataError(f"'conversations' must be a list, got {type(turns_raw).__name__}",
                        code=problems.WRONG_TYPE)
    refuse_video_fields(record)
    images = record_images(record)
    system = record_system(record)
    turns: list[Turn] = [Turn("system", [system])] if system is not None else []
    n_slots = 0
    for i, turn in enumerate(turns_raw):
        if not isinstance(turn, dict):
            raise DataError(f"conversations[{i}] must be an object, got {type(turn).__name__}",
                            code=problems.WRONG_TYPE)
        who = turn.get("from", turn.get("role"))
        if not isinstance(who, str) or who not in ROLE_NAMES:
            raise DataError(f"conversations[{i}] has unknown role {who!r}; expected one of "
                            f"{', '.join(sorted(ROLE_NAMES))}", code=problems.UNKNOWN_ROLE)
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise DataError(f"conversations[{i}].value must be a string, got {type(value).__name__}",
                            code=problems.NON_STRING_CONTENT)
        refuse_video_text(value, f"conversations[{i}]")
        if system is not None and ROLE_NAMES[who] == "system":
            raise DataError(both_system(f"conversations[{i}]"), code=problems.TURN_ORDER)
        parts = split_placeholders(value, n_slots)
        n_slots += sum(isinstance(p, ImageSlot) for p in parts)
        turns.append(Turn(ROLE_NAMES[who], parts))
    if n_slots != len(images):
        raise DataError(f"{n_slots} '{PLACEHOLDER}' placeholder(s) but {len(images)} image(s)",
                        code=problems.PLACEHOLDER_MISMATCH)
    return Conversation(turns=turns, images=images)


def both_system(where: str) -> str:
    return (f"the record has both a top-level 'system' column and a system turn ({where}): keep one "
            "(which one is meant cannot be guessed)")
