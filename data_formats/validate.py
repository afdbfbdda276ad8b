"""Image checks for a parsed :class:`Conversation` (structure is checked while parsing).

Every image is resolved against the conversation's image root (path-escape guard), its pixel count
checked from the header (decompression-bomb guard) and decoded once (corrupt / truncated files).
A bounded cache remembers files already proven good, so a dataset that reuses a few images is
validated at text speed.
"""

from __future__ import annotations

from collections import OrderedDict

from vlm.data_formats.conversation import Conversation
from vlm.data_formats.images import DEFAULT_MAX_IMAGE_PIXELS, open_image
from vlm.data_formats.records import located
from vlm.data_formats.video import video_header
from vlm.errors import DataError

GOOD_PATH_CACHE = 4096


class ImageValidator:
    """``validator(conv)`` raises a located :class:`DataError` for the first bad image."""

    def __init__(self, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, decode: bool = True):
        self.max_image_pixels = max_image_pixels
        self.decode = decode
        self._good: OrderedDict[tuple, None] = OrderedDict()

    def __call__(self, conv: Conversation) -> None:
        for i, ref in enumerate(conv.images):
            try:
                key = None
                if ref.kind == "path":
                    key = (conv.image_root, ref.value)   # same root + same path = same verdict
                    if key in self._good:
                        self._good.move_to_end(key)
                        continue
                img = open_image(ref, conv.image_root, max_image_pixels=self.max_image_pixels,
                                 decode=self.decode)
                if ref.kind != "pil":
                    img.close()
                if key is not None:
                    self._good[key] = None
                    if len(self._good) > GOOD_PATH_CACHE:
                        self._good.popitem(last=False)
            except DataError as e:
                prefix = f"image {i + 1} of {len(conv.images)}: " if len(conv.images) > 1 else ""
                err = DataError(prefix + e.problem, code=e.code)
                raise located(err, source=conv.source, index=conv.index, record_id=conv.record_id) from None
        for i, ref in enumerate(conv.videos):
            try:
                video_header(ref, conv.image_root)   # opens the container: frames, rate, size
            except DataError as e:
                err = DataError(f"video {i + 1} of {len(conv.videos)}: {e.problem}", code=e.code)
                raise located(err, source=conv.source, index=conv.index, record_id=conv.record_id) from None
