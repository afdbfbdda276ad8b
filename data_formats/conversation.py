"""The normalized conversation every reader produces and the collator consumes.

A :class:`Conversation` is an ordered list of :class:`Turn`s. Each turn holds *parts*: plain text
(``str``), an :class:`ImageSlot` that points into ``Conversation.images`` by position, or a
:class:`VideoSlot` that points into ``Conversation.videos``. Images are
:class:`ImageRef`s: a reference (path, data URL, raw bytes, or a PIL image already in memory) that is
resolved and decoded only when needed (validation, collation), so reading stays cheap.

Example (one image, one question, one answer)::

    Conversation(
        turns=[Turn("user", [ImageSlot(0), "What is shown?"]), Turn("assistant", ["A red circle."])],
        images=[ImageRef.from_path("img/0.png")], record_id="0", source="data.json", index=0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ImageSlot:
    """Where an image sits inside a turn: ``index`` into ``Conversation.images``.

    ``placeholder`` is True when the slot came from an ``<image>`` written in text (LLaVA style):
    the newline written next to such a placeholder is layout, not content."""

    index: int
    placeholder: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class VideoSlot:
    """Where a video sits inside a turn: ``index`` into ``Conversation.videos``."""

    index: int
    placeholder: bool = field(default=False, compare=False)


Part = Union[str, ImageSlot, VideoSlot]


@dataclass
class Turn:
    """One message: ``role`` in :data:`ROLES`, ``parts`` in reading order."""

    role: str
    parts: list[Part]
    trainable: bool = True   # False: an assistant turn that is context only (TRL's prompt part)

    @property
    def text(self) -> str:
        """The turn's text with images removed (parts joined without separators)."""
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def image_slots(self) -> list[ImageSlot]:
        return [p for p in self.parts if isinstance(p, ImageSlot)]


@dataclass
class ImageRef:
    """A reference to one image; decoding happens in :mod:`vlm.data_formats.images`.

    ``kind`` is one of ``path`` (relative paths resolve against the image root), ``data_url``
    (``data:image/png;base64,...``), ``bytes`` (encoded file bytes) or ``pil`` (a ``PIL.Image``).
    """

    kind: str
    value: Any

    @classmethod
    def from_path(cls, path: str) -> "ImageRef":
        return cls("path", path)

    def describe(self) -> str:
        """Short human text for error messages (never dumps bytes)."""
        if self.kind == "path":
            return repr(self.value)
        if self.kind == "data_url":
            return f"data URL ({len(self.value)} chars)"
        if self.kind == "bytes":
            return f"embedded image ({len(self.value)} bytes)"
        return "in-memory PIL image"


@dataclass
class Conversation:
    """One training sample. ``source``/``index``/``record_id`` locate it for error messages."""

    turns: list[Turn]
    images: list[ImageRef] = field(default_factory=list)
    record_id: str | None = None
    source: str | None = None
    index: int | None = None
    image_root: str | None = None   # where relative image paths resolve (default: the file's folder)
    videos: list[ImageRef] = field(default_factory=list)   # video files (kind "path"), after the
                                                            # older fields: positional use unchanged
    # Collator plans of this sample (key: the collator's settings), so that planning in
    # prepare_samples is not redone by every batch; a few bytes per token (see SamplePlan).
    plan_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def roles(self) -> list[str]:
        return [t.role for t in self.turns]

    def assistant_turn_indices(self) -> list[int]:
        """Assistant turns that train (those of a TRL ``prompt`` are context only)."""
        return [i for i, t in enumerate(self.turns) if t.role == "assistant" and t.trainable]

    def image_order(self) -> list[int]:
        """Image indices in the order they appear in the text (what a processor consumes)."""
        return [s.index for t in self.turns for s in t.image_slots]

    def media_order(self) -> list[tuple[str, int]]:
        """``("image", i)`` / ``("video", j)`` in the order they appear in the text."""
        return [("image", p.index) if isinstance(p, ImageSlot) else ("video", p.index)
                for t in self.turns for p in t.parts if isinstance(p, (ImageSlot, VideoSlot))]

    def to_messages(self) -> list[dict]:
        """HF chat-template messages: content lists of ``{"type": "text"|"image"}`` items.

        The ``\n`` that LLaVA data puts between an ``<image>`` placeholder and the question is
        layout, not text: newlines touching a *placeholder* are dropped (the templates write their
        own). Text next to an image *part* is kept exactly, as transformers'
        ``apply_chat_template`` keeps it ("book?\n" then an image stays "book?\n<image>").
        """
        messages = []
        for turn in self.turns:
            content = []
            parts = turn.parts
            for i, p in enumerate(parts):
                if isinstance(p, (ImageSlot, VideoSlot)):
                    content.append({"type": "image" if isinstance(p, ImageSlot) else "video"})
                    continue
                if i > 0 and isinstance(parts[i - 1], (ImageSlot, VideoSlot)) and parts[i - 1].placeholder:
                    p = p.lstrip("\n")
                if (i + 1 < len(parts) and isinstance(parts[i + 1], (ImageSlot, VideoSlot))
                        and parts[i + 1].placeholder):
                    p = p.rstrip("\n")
                if p:
                    content.append({"type": "text", "text": p})
            messages.append({"role": turn.role, "content": content})
        return messages

    def to_sharegpt(self, placeholder: str = "<image>") -> dict:
        """The LLaVA/ShareGPT record for this conversation (image paths only)."""
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        record: dict[str, Any] = {}
        if self.record_id is not None:
            record["id"] = self.record_id
        if self.images:
            paths = [img.value for img in self.images]
            record["image"] = paths[0] if len(paths) == 1 else paths
        if self.videos:
            paths = [v.value for v in self.videos]
            record["video"] = paths[0] if len(paths) == 1 else paths
        record["conversations"] = [
            {"from": names[t.role],
             "value": "".join(placeholder if isinstance(p, ImageSlot) else
                              "<video>" if isinstance(p, VideoSlot) else p for p in t.parts)}
            for t in self.turns]
        return record
