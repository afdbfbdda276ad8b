"""Reader for OpenAI-style ``messages`` records.

``{"messages": [{"role": "system"|"user"|"assistant", "content": str | [part, ...]}], "images": [...]}``

A part is ``{"type": "text", "text": str}``, ``{"type": "image", "image"|"path": ...}``,
``{"type": "image"}`` (takes the next entry of ``images``) or
``{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}``. In string content,
``<image>`` takes the next entry of ``images`` too. TRL's singular ``image`` column and
LLaMA-Factory's top-level ``system`` column are read as well (see :mod:`.record_fields`).
"""

from __future__ import annotations

from typing import Any

from vlm.data_formats import problems
from vlm.data_formats.conversation import Conversation, ImageRef, ImageSlot, Part, Turn
from vlm.data_formats.image_refs import to_image_ref
from vlm.data_formats.record_fields import (record_images, record_system, refuse_video_fields,
                                            refuse_video_text, video_refusal)
from vlm.data_formats.sharegpt import PLACEHOLDER, both_system, split_placeholders
from vlm.errors import DataError

ROLES = ("system", "user", "assistant")


class _ImagePool:
    """Images listed beside the messages, handed out in order; inline images are appended."""

    def __init__(self, listed: list[ImageRef]):
        self.listed = listed
        self.taken = 0
        self.order: list[ImageRef] = []

    def next_listed(self, where: str) -> int:
        if self.taken >= len(self.listed):
            raise DataError(f"{where} asks for image #{self.taken + 1} but the record lists "
                            f"{len(self.listed)} ('image' / 'images')", code=problems.PLACEHOLDER_MISMATCH)
        self.order.append(self.listed[self.taken])
        self.taken += 1
        return len(self.order) - 1

    def inline(self, ref: ImageRef) -> int:
        self.order.append(ref)
        return len(self.order) - 1


def _parts_of(content: Any, pool: _ImagePool, where: str) -> list[Part]:
    if isinstance(content, str):
        refuse_video_text(content, where)
        parts: list[Part] = []
        for p in split_placeholders(content, 0):
            parts.append(ImageSlot(pool.next_listed(where), placeholder=True) if isinstance(p, ImageSlot) else p)
        return parts
    if not isinstance(content, list):
        raise DataError(f"{where}.content must be a string or a list of parts, got "
                        f"{type(content).__name__}", code=problems.NON_STRING_CONTENT)
    parts = []
    for j, item in enumerate(content):
        at = f"{where}.content[{j}]"
        if isinstance(item, str):
            item = {"type": "text", "text": item}
        if not isinstance(item, dict):
            raise DataError(f"{at} must be an object, got {type(item).__name__}", code=problems.WRONG_TYPE)
        kind = item.get("type")
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise DataError(f"{at}.text must be a string, got {type(text).__name__}",
                                code=problems.NON_STRING_CONTENT)
            refuse_video_text(text, at)
            parts.extend(p if isinstance(p, str) else ImageSlot(pool.next_listed(at), placeholder=True)
                         for p in split_placeholders(text, 0))
        elif kind == "image":
            value = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
            slot = pool.next_listed(at) if value is None else pool.inline(to_image_ref(value, at))
            parts.append(ImageSlot(slot))
        elif kind == "image_url":
            url = item.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append(ImageSlot(pool.inline(to_image_ref(url, f"{at}.image_url"))))
        elif kind in ("video", "video_url"):
            raise DataError(video_refusal(f"{at} (a {kind!r} part)"), code=problems.VIDEO_UNSUPPORTED)
        else:
            raise DataError(f"{at} has unknown type {kind!r} (expected text, image or image_url)",
                            code=problems.WRONG_TYPE)
    return parts


def parse_messages(record: dict[str, Any]) -> Conversation:
    """One messages record -> :class:`Conversation`; raises :class:`DataError` (no location yet)."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DataError(f"'messages' must be a list, got {type(messages).__name__}",
                        code=problems.WRONG_TYPE)
    refuse_video_fields(record)
    pool = _ImagePool(record_images(record))
    system = record_system(record)
    turns = [Turn("system", [system])] if system is not None else []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object, got {type(message).__name__}",
                            code=problems.WRONG_TYPE)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where} has unknown role {role!r}; expected one of {', '.join(ROLES)}",
                            code=problems.UNKNOWN_ROLE)
        if system is not None and role == "system":
            raise DataError(both_system(where), code=problems.TURN_ORDER)
        turns.append(Turn(role, _parts_of(message.get("content"), pool, where)))
    if pool.taken != len(pool.listed):
        raise DataError(f"'images' has {len(pool.listed)} image(s) but the messages place "
                        f"{pool.taken} ({PLACEHOLDER} or image parts)", code=problems.PLACEHOLDER_MISMATCH)
    return Conversation(turns=turns, images=pool.order)
