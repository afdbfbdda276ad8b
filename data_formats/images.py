"""Resolve and decode images safely.

- Relative paths resolve against the image root (default: the data file's folder). A path that
  leaves the root (``../x.png``, an absolute path elsewhere, a symlink pointing out) is refused:
  a dataset must not make the trainer read arbitrary files.
- The pixel count is checked from the header *before* decoding (decompression-bomb guard), against
  ``max_image_pixels`` (default 64 MP, far above any VLM input; PIL's own guard is 89 MP + warning).
- Corrupt or truncated files are reported as such, with the path.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path

from vlm.data_formats import problems
from vlm.data_formats.conversation import ImageRef
from vlm.errors import DataError

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


def resolve_image_path(path: str, image_root: str | os.PathLike | None) -> Path:
    """The real file a record's path names, refusing anything outside ``image_root``."""
    root = Path(image_root or ".").resolve()
    candidate = Path(path)
    full = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if full != root and root not in full.parents:
        raise DataError(f"image path {path!r} escapes the image root {str(root)!r}",
                        code=problems.PATH_ESCAPE)
    if not full.is_file():
        raise DataError(f"image file {path!r} not found (looked at {str(full)!r})",
                        code=problems.MISSING_IMAGE)
    return full


def _decode_data_url(url: str) -> bytes:
    head, _, payload = url.partition(",")
    if not head.endswith(";base64") or not payload:
        raise DataError(f"image data URL must be 'data:image/...;base64,<data>' (got {head[:40]!r})",
                        code=problems.CORRUPT_IMAGE)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"image data URL is not valid base64: {e}", code=problems.CORRUPT_IMAGE) from None


def open_image(ref: ImageRef, image_root: str | os.PathLike | None = None, *,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, decode: bool = True):
    """Open ``ref`` as an RGB ``PIL.Image`` (``decode=False``: header only, for sizes).

    Raises :class:`DataError` with code ``path_escape``, ``missing_image``, ``corrupt_image`` or
    ``image_too_large``.
    """
    from PIL import Image

    what = ref.describe()
    if ref.kind == "pil":
        img = ref.value
    else:
        if ref.kind == "path":
            source = resolve_image_path(ref.value, image_root)
        elif ref.kind == "data_url":
            source = io.BytesIO(_decode_data_url(ref.value))
        else:
            source = io.BytesIO(ref.value)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataError(f"image {what} is a decompression bomb (PIL refused its size)",
                            code=problems.IMAGE_TOO_LARGE) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"image {what} is unreadable: {e}", code=problems.CORRUPT_IMAGE) from None
    width, height = img.size
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise DataError(f"image {what} has {width}x{height} = {width * height:,} pixels, over the "
                        f"limit of {max_image_pixels:,} (decompression-bomb guard; raise "
                        f"max_image_pixels if this is intended)", code=problems.IMAGE_TOO_LARGE)
    if not decode:
        return img
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {what} is a decompression bomb", code=problems.IMAGE_TOO_LARGE) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {what} is corrupt or truncated: {e}", code=problems.CORRUPT_IMAGE) from None


def image_size(ref: ImageRef, image_root=None, *, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(height, width)`` from the header only (cheap: no decode)."""
    img = open_image(ref, image_root, max_image_pixels=max_image_pixels, decode=False)
    return img.size[1], img.size[0]
