"""The reading pipeline: source -> raw records -> parsed :class:`Conversation` -> image checks.

``on_error="raise"`` stops at the first bad record with an error naming file, record and problem.
``on_error="skip"`` counts it in a :class:`RejectLog` (written to a rejects file if one is given)
and goes on; the caller reports ``rejects.summary()`` at the end. Nothing is dropped silently:
skipping without a RejectLog is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from vlm.data_formats import problems
from vlm.data_formats.conversation import Conversation
from vlm.data_formats.images import DEFAULT_MAX_IMAGE_PIXELS
from vlm.data_formats.records import parse_record
from vlm.data_formats.rejects import RejectLog
from vlm.data_formats.sources import default_image_root, iter_raw_records, source_name
from vlm.data_formats.validate import ImageValidator
from vlm.errors import ConfigError, DataError

ON_ERROR = ("raise", "skip")


@dataclass
class DataSpec:
    """One data source in a mix: a path / ``datasets.Dataset`` / list, its weight and image root.

    ``weight`` is how many times each record is used per epoch on average (2.0 = twice,
    0.5 = a seeded random half)."""

    source: Any
    weight: float = 1.0
    image_root: str | None = None

    @property
    def name(self) -> str:
        return source_name(self.source)

    @classmethod
    def parse(cls, item: Any) -> "DataSpec":
        """A spec from a config entry: a path, ``"path:weight"`` style is *not* used (paths may hold
        ':'), a dict ``{"path"|"source": ..., "weight": ..., "image_root": ...}`` or a DataSpec."""
        if isinstance(item, DataSpec):
            return item
        if isinstance(item, dict):
            src = item.get("path", item.get("source"))
            if src is None:
                raise ConfigError(f"data entry {item!r} needs 'path'")
            weight = float(item.get("weight", 1.0))
            if weight <= 0:
                raise ConfigError(f"data entry {src}: weight must be > 0, got {weight}")
            return cls(src, weight, item.get("image_root"))
        return cls(item)


def check_on_error(on_error: str, rejects: RejectLog | None) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if on_error == "skip" and rejects is None:
        raise ConfigError("on_error='skip' needs a RejectLog to count and report what is skipped")


def iter_conversations(source: Any, *, image_root: str | None = None, on_error: str = "raise",
                       rejects: RejectLog | None = None, validate_images: bool = True,
                       max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                       validator: ImageValidator | None = None) -> Iterator[Conversation]:
    """Stream valid conversations from one source (memory does not grow with its size)."""
    check_on_error(on_error, rejects)
    if validate_images and validator is None:
        validator = ImageValidator(max_image_pixels)
    root = str(image_root) if image_root is not None else default_image_root(source)
    seen = 0
    for item in iter_raw_records(source):
        seen += 1
        raw = None
        try:
            if isinstance(item, DataError):
                raise item
            raw = item.data
            conv = parse_record(raw, source=item.source, index=item.index, image_root=root)
            if validate_images:
                validator(conv)
        except DataError as e:
            if on_error == "raise":
                raise
            rejects.add(e, raw)
            continue
        yield conv
    if not seen:
        # An empty file is a mistake (a failed export, the wrong path), not an empty epoch.
        err = DataError("no records in the file", file=source_name(source), code=problems.EMPTY_SOURCE)
        if on_error == "raise":
            raise err
        rejects.add(err)


def read_conversations(sources: Any, **kwargs) -> list[Conversation]:
    """All valid conversations of one source or a list of sources/specs (weights ignored: see
    :func:`vlm.data_formats.mixing.mix_epoch`), in order, as a list."""
    specs = [DataSpec.parse(s) for s in (sources if isinstance(sources, (list, tuple)) and
                                         not _is_record_list(sources) else [sources])]
    image_root = kwargs.pop("image_root", None)
    out: list[Conversation] = []
    for spec in specs:
        out.extend(iter_conversations(spec.source, image_root=spec.image_root or image_root, **kwargs))
    return out


def _is_record_list(items) -> bool:
    return bool(items) and isinstance(items[0], dict) and any(
        k in items[0] for k in ("conversations", "messages", "prompt"))
