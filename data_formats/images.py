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


MAX_SHOWN_PATH = 200   # characters of a path shown in an error (a 5,000-character path is noise)


def _shown(path: str) -> str:
    return repr(path if len(path) <= MAX_SHOWN_PATH else path[:MAX_SHOWN_PATH] + f"...({len(path)} chars)")


def resolve_image_path(path: str, image_root: str | os.PathLike | None, what: str = "image") -> Path:
    """The real file a record's path names, refusing anything outside ``image_root``.

    Paths the operating system cannot even look up (a NUL byte, a name too long, a symlink loop)
    are ``missing_image`` errors naming the path, never a raw exception. ``what``: "image" or
    "video", the word the errors use (video files live under the same root)."""
    if "\x00" in path:
        raise DataError(f"{what} path {_shown(path)} contains a NUL byte", code=problems.MISSING_IMAGE)
    try:
        root = Path(image_root or ".").resolve()
        candidate = Path(path)
        full = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if full != root and root not in full.parents:
            how = ("absolute paths are allowed under the image root: set data.image_root (config) or "
                   "--image-root (vlm data) to a folder that holds them" if candidate.is_absolute() else
                   "set data.image_root / --image-root to a folder that holds it")
            raise DataError(f"{what} path {_shown(path)} escapes the image root {str(root)!r}: {how}",
                            code=problems.PATH_ESCAPE)
        if not full.is_file():
            raise DataError(f"{what} file {_shown(path)} not found (looked at {_shown(str(full))})",
                            code=problems.MISSING_IMAGE)
    except (OSError, RuntimeError, ValueError) as e:   # RuntimeError: symlink loop (Python < 3.13)
        raise DataError(f"{what} path {_shown(path)} cannot be looked up: {type(e).__name__}: "
                        f"{str(e)[:MAX_SHOWN_PATH]}", code=problems.MISSING_IMAGE) from None
    return full


def to_rgb(img):
    """``img`` as 8-bit RGB without losing its brightness.

    ``convert("RGB")`` clips 16-bit greyscale (``I;16`` / ``I``: 0-65535) at 255, turning nearly
    every pixel white; those are scaled by 255/65535 first."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        import numpy as np
        from PIL import Image

        arr = np.asarray(img).astype(np.float64)
        eight = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    return img.convert("RGB")


def exif_rotation(img) -> int:
    """The EXIF orientation tag (1 = as stored; 5-8 swap width and height), from the header."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject an otherwise good image
        return 1


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
    orientation = exif_rotation(img)
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
        if orientation != 1:   # cameras store pixels unrotated and say how to show them
            from PIL import ImageOps

            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {what} is a decompression bomb", code=problems.IMAGE_TOO_LARGE) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {what} is corrupt or truncated: {e}", code=problems.CORRUPT_IMAGE) from None


def image_size(ref: ImageRef, image_root=None, *, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(height, width)`` as displayed (EXIF orientation applied), from the header only."""
    img = open_image(ref, image_root, max_image_pixels=max_image_pixels, decode=False)
    width, height = img.size
    if exif_rotation(img) in (5, 6, 7, 8):
        width, height = height, width
    return height, width
