"""Record-level fields every layout shares: the image column(s), a top-level ``system`` column, and
video fields (refused until video is supported: a video must never be trained as ``<video>`` text).

Other tools name these differently: LLaVA / ShareGPT4V / Qwen2-VL-Finetune write ``image`` (a path
or a list), LLaMA-Factory and TRL write ``images`` (TRL also a singular ``image``), LLaMA-Factory
keeps the system prompt in a ``system`` column and video in ``videos`` (Qwen2-VL-Finetune:
``video``). A record holding two spellings of one field is ambiguous and refused, never resolved by
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
    return image_list(record.get(present[0]), present[0]) if present else []


def record_system(record: dict[str, Any]) -> str | None:
    """LLaMA-Factory's top-level ``system`` column (None when absent or empty)."""
    value = record.get("system")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"'system' must be a string, got {type(value).__name__}",
                        code=problems.NON_STRING_CONTENT)
    return value


def refuse_video_fields(record: dict[str, Any]) -> None:
    for key in VIDEO_FIELDS:
        value = record.get(key)
        if value is not None and value != [] and value != "":
            raise DataError(video_refusal(f"the record's {key!r} field"), code=problems.VIDEO_UNSUPPORTED)


def refuse_video_text(text: str, where: str) -> None:
    if VIDEO_PLACEHOLDER in text:
        raise DataError(video_refusal(f"{where} (a {VIDEO_PLACEHOLDER} placeholder)"),
                        code=problems.VIDEO_UNSUPPORTED)


def video_refusal(what: str) -> str:
    return (f"{what} asks for video, which this version does not train (it would be read as plain "
            "text with no video tokens): drop the video records or split them into image frames")
