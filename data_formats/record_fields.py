"""Record-level fields every layout shares: the image column(s), a top-level ``system`` column, and
the video column(s).

Other tools name these differently: LLaVA / ShareGPT4V / Qwen2-VL-Finetune write ``image`` (a path
or a list), LLaMA-Factory and TRL write ``images`` (TRL also a singular ``image``), LLaMA-Factory
keeps the system prompt in a ``system`` column and video in ``videos`` (Qwen2-VL-Finetune:
``video``), each ``<video>`` in the text taking the next one. A record holding two spellings of one field is ambiguous and refused, never resolved by
silently ignoring one of them.
"""

from __future__ import annotations

from typing import Any

from vlm.data_formats import problems
from vlm.data_formats.conversation import ImageRef
from vlm.data_formats.image_refs import image_list
from vlm.errors import DataError

VIDEO_PLACEHOLDER = "<video>"
VIDEO_FIELDS = ("video", "videos")


def record_images(record: dict[str, Any]) -> list[ImageRef]:
    """The record's images from ``image`` or ``images`` (exactly one of them may be set)."""
    present = [k for k in ("image", "images") if record.get(k) is not None]
    if len(present) == 2:
        raise DataError("the record has both 'image' and 'images': keep one list of images "
                        "(which one is meant cannot be guessed)", code=problems.WRONG_TYPE)
    return image_list(record.get(present[0]), present[0], kind="video") if present else []


def record_system(record: dict[str, Any]) -> str | None:
    """LLaMA-Factory's top-level ``system`` column (None when absent or empty)."""
    value = record.get("system")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"'system' must be a string, got {type(value).__name__}",
                        code=problems.NON_STRING_CONTENT)
    return value


def record_videos(record: dict[str, Any]) -> list[ImageRef]:
    """The record's videos from ``video`` (Qwen2-VL-Finetune) or ``videos`` (LLaMA-Factory)."""
    present = [k for k in VIDEO_FIELDS if record.get(k) is not None and record.get(k) != []]
    if len(present) == 2:
        raise DataError("the record has both 'video' and 'videos': keep one list of videos",
                        code=problems.WRONG_TYPE)
    return image_list(record.get(present[0]), present[0], kind="video") if present else []
