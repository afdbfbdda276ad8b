"""Reader for LLaVA / ShareGPT records.

``{"id": ..., "image": str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}``

Each ``<image>`` in a value marks where the next image of ``image`` (or ``images``) goes, in order.
LLaMA-Factory's variant (``images`` list, a top-level ``system`` column, ``role``/``content`` tags)
reads the same way (see :mod:`.record_fields`).
"""

from __future__ import annotations

import re
from typing import Any

from vlm.data_formats import problems
from vlm.data_formats.conversation import Conversation, ImageSlot, Part, Turn, VideoSlot
from vlm.data_formats.record_fields import VIDEO_PLACEHOLDER, record_images, record_system, record_videos
from vlm.errors import DataError

PLACEHOLDER = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "model": "assistant", "system": "system"}


_MEDIA = re.compile(f"({re.escape(PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def split_placeholders(text: str, next_image: int, next_video: int = 0) -> list[Part]:
    """``"a<image>b<video>"`` -> ``["a", ImageSlot(next_image), "b", VideoSlot(next_video)]``
    (empty strings dropped)."""
    parts: list[Part] = []
    for piece in _MEDIA.split(text):
        if piece == PLACEHOLDER:
            parts.append(ImageSlot(next_image, placeholder=True))
            next_image += 1
        elif piece == VIDEO_PLACEHOLDER:
            parts.append(VideoSlot(next_video, placeholder=True))
            next_video += 1
        elif piece:
            parts.append(piece)
    return parts


def parse_sharegpt(record: dict[str, Any]) -> Conversation:
    """One ShareGPT record -> :class:`Conversation`; raises :class:`DataError` (no location yet)."""
    turns_raw = record.get("conversations")
    if not isinstance(turns_raw, list):
        raise DataError(f"'conversations' must be a list, got {type(turns_raw).__name__}",
                        code=problems.WRONG_TYPE)
    images = record_images(record)
    videos = record_videos(record)
    system = record_system(record)
    turns: list[Turn] = [Turn("system", [system])] if system is not None else []
    n_slots = n_video_slots = 0
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
        if system is not None and ROLE_NAMES[who] == "system":
            raise DataError(both_system(f"conversations[{i}]"), code=problems.TURN_ORDER)
        parts = split_placeholders(value, n_slots, n_video_slots)
        n_slots += sum(isinstance(p, ImageSlot) for p in parts)
        n_video_slots += sum(isinstance(p, VideoSlot) for p in parts)
        turns.append(Turn(ROLE_NAMES[who], parts))
    if n_slots != len(images):
        raise DataError(f"{n_slots} '{PLACEHOLDER}' placeholder(s) but {len(images)} image(s)",
                        code=problems.PLACEHOLDER_MISMATCH)
    if n_video_slots != len(videos):
        raise DataError(f"{n_video_slots} '{VIDEO_PLACEHOLDER}' placeholder(s) but {len(videos)} video(s)",
                        code=problems.PLACEHOLDER_MISMATCH)
    return Conversation(turns=turns, images=images, videos=videos)


def both_system(where: str) -> str:
    return (f"the record has both a top-level 'system' column and a system turn ({where}): keep one "
            "(which one is meant cannot be guessed)")
