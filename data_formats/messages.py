"""Reader for OpenAI-style ``messages`` records.

``{"messages": [{"role": "system"|"user"|"assistant", "content": str | [part, ...]}], "images": [...]}``

A part is ``{"type": "text", "text": str}``, ``{"type": "image", "image"|"path": ...}``,
``{"type": "image"}`` (takes the next entry of ``images``), ``{"type": "video", "video": path}`` /
``{"type": "video"}`` (the next entry of ``videos``) or
``{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}``. In string content,
``<image>`` takes the next entry of ``images`` too. TRL's singular ``image`` column and
LLaMA-Factory's top-level ``system`` column are read as well (see :mod:`.record_fields`).
"""

from __future__ import annotations

from typing import Any

from vlm.data_formats import problems
from vlm.data_formats.conversation import Conversation, ImageRef, ImageSlot, Part, Turn, VideoSlot
from vlm.data_formats.image_refs import to_image_ref
from vlm.data_formats.record_fields import record_images, record_system, record_videos
from vlm.data_formats.sharegpt import PLACEHOLDER, both_system, split_placeholders
from vlm.errors import DataError

ROLES = ("system", "user", "assistant")


class _ImagePool:
    """Images (or videos) listed beside the messages, handed out in order; inline ones are appended."""

    def __init__(self, listed: list[ImageRef], kind: str = "image"):
        self.listed = listed
        self.kind = kind
        self.taken = 0
        self.order: list[ImageRef] = []

    def next_listed(self, where: str) -> int:
        if self.taken >= len(self.listed):
            raise DataError(f"{where} asks for {self.kind} #{self.taken + 1} but the record lists "
                            f"{len(self.listed)} ('{self.kind}' / '{self.kind}s')",
                            code=problems.PLACEHOLDER_MISMATCH)
        self.order.append(self.listed[self.taken])
        self.taken += 1
        return len(self.order) - 1

    def inline(self, ref: ImageRef) -> int:
        self.order.append(ref)
        return len(self.order) - 1


def _placed(pieces: list[Part], pool: _ImagePool, videos: _ImagePool, where: str) -> list[Part]:
    """Text pieces with ``<image>`` / ``<video>`` slots numbered from the listed pools."""
    out: list[Part] = []
    for p in pieces:
        if isinstance(p, ImageSlot):
            p = ImageSlot(pool.next_listed(where), placeholder=True)
        elif isinstance(p, VideoSlot):
            p = VideoSlot(videos.next_listed(where), placeholder=True)
        out.append(p)
    return out


def _parts_of(content: Any, pool: _ImagePool, where: str, videos: _ImagePool) -> list[Part]:
    if isinstance(content, str):
        return _placed(split_placeholders(content, 0), pool, videos, where)
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
            parts.extend(_placed(split_placeholders(text, 0), pool, videos, at))
        elif kind == "image":
            value = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
            slot = pool.next_listed(at) if value is None else pool.inline(to_image_ref(value, at))
            parts.append(ImageSlot(slot))
        elif kind == "image_url":
            url = item.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append(ImageSlot(pool.inline(to_image_ref(url, f"{at}.image_url"))))
        elif kind == "video":
            value = next((item[k] for k in ("video", "path", "url") if item.get(k) is not None), None)
            slot = videos.next_listed(at) if value is None else videos.inline(to_image_ref(value, at, kind="video"))
            parts.append(VideoSlot(slot))
        else:
            raise DataError(f"{at} has unknown type {kind!r} (expected text, image, image_url or video)",
                            code=problems.WRONG_TYPE)
    return parts


def parse_messages(record: dict[str, Any]) -> Conversation:
    """One messages record -> :class:`Conversation`; raises :class:`DataError` (no location yet)."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DataError(f"'messages' must be a list, got {type(messages).__name__}",
                        code=problems.WRONG_TYPE)
    pool = _ImagePool(record_images(record))
    videos = _ImagePool(record_videos(record), "video")
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
        turns.append(Turn(role, _parts_of(message.get("content"), pool, where, videos)))
    if pool.taken != len(pool.listed):
        raise DataError(f"'images' has {len(pool.listed)} image(s) but the messages place "
                        f"{pool.taken} ({PLACEHOLDER} or image parts)", code=problems.PLACEHOLDER_MISMATCH)
    if videos.taken != len(videos.listed):
        raise DataError(f"'videos' has {len(videos.listed)} video(s) but the messages place "
                        f"{videos.taken} (<video> or video parts)", code=problems.PLACEHOLDER_MISMATCH)
    return Conversation(turns=turns, images=pool.order, videos=videos.order)
