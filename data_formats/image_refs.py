"""Turn the many ways a record can name an image into an :class:`ImageRef` (no decoding here)."""

from __future__ import annotations

from typing import Any

from vlm.data_formats import problems
from vlm.data_formats.conversation import ImageRef
from vlm.errors import DataError


def to_image_ref(value: Any, what: str = "image", kind: str = "image") -> ImageRef:
    """A path string, ``data:`` URL, encoded bytes, ``{"bytes"|"path"}`` dict (parquet / datasets
    Image feature) or a PIL image -> :class:`ImageRef`. Anything else is a ``wrong_type`` error.
    ``kind="video"``: the same forms are parsed (validation then wants a file path), the errors
    speak of videos."""
    if isinstance(value, str):
        if value.startswith("data:"):
            return ImageRef("data_url", value)
        if value.startswith(("http://", "https://")):
            raise DataError(f"{what} {value!r} is a remote URL; {kind}s are never downloaded "
                            "(offline by design): store the file and give its path",
                            code=problems.MISSING_IMAGE)
        if value.startswith("file://"):
            value = value[len("file://"):]
        if not value:
            raise DataError(f"{what} is an empty path", code=problems.WRONG_TYPE)
        return ImageRef("path", value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageRef("bytes", bytes(value))
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return to_image_ref(value["bytes"], what, kind)
        if value.get("path") is not None:
            return to_image_ref(value["path"], what, kind)
        if value.get("url") is not None:
            return to_image_ref(value["url"], what, kind)
        raise DataError(f"{what} is a dict without 'bytes', 'path' or 'url'", code=problems.WRONG_TYPE)
    if _is_pil(value):
        return ImageRef("pil", value)
    accepted = "a video file path string" if kind == "video" else "a path string, data URL, bytes or PIL image"
    raise DataError(f"{what} must be {accepted}, got {type(value).__name__}", code=problems.WRONG_TYPE)


def image_list(value: Any, field: str, kind: str = "image") -> list[ImageRef]:
    """A record's image (or video) field: absent/None -> [], a single one -> [it], a list -> each."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [to_image_ref(v, f"{field}[{i}]", kind) for i, v in enumerate(value)]
    return [to_image_ref(value, field, kind)]


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(value, Image.Image)
