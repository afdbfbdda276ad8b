"""Image resolution, set once and saved with the model so eval and serving see the same pixels.

:class:`Resolution` holds ``min_pixels``/``max_pixels`` (Qwen2-VL family: the image is resized so
its pixel count lands in that range, which fixes the image-token count) or ``longest_edge``
(Pixtral: the longer side is capped). LLaVA-1.5 and Mllama have a fixed input size set by their
vision tower; asking to change it is a :class:`ConfigError`.

:func:`apply_resolution` sets it on a processor's image processor (in place).
:func:`save_resolution` writes it under the ``"vlmtune"`` key of ``config.json`` (a model or
merged folder; transformers keeps unknown config keys) or of ``vlmtune.json`` (an adapter folder,
which must not look like a model folder), atomically; :func:`load_resolution` reads it back. Save
the processor too (``processor.save_pretrained``) after :func:`apply_resolution`: its own files then
carry the same sizes for plain transformers / vLLM users.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vlm.atomic import write_json
from vlm.errors import ConfigError

META_KEY = "vlmtune"
CONFIG_FILES = ("config.json", "vlmtune.json")   # model/merged folders; adapter folders


@dataclass(frozen=True)
class Resolution:
    min_pixels: int | None = None
    max_pixels: int | None = None
    longest_edge: int | None = None

    def is_default(self) -> bool:
        return self.min_pixels is None and self.max_pixels is None and self.longest_edge is None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Resolution":
        d = d or {}
        unknown = set(d) - {"min_pixels", "max_pixels", "longest_edge"}
        if unknown:
            raise ConfigError(f"resolution keys {sorted(unknown)} unknown; use min_pixels, "
                              "max_pixels (Qwen2-VL) or longest_edge (Pixtral)")
        return cls(**{k: int(v) for k, v in d.items() if v is not None})


def apply_resolution(processor, resolution: Resolution | dict | None) -> None:
    """Set the resolution on ``processor.image_processor`` (no-op for the default)."""
    if resolution is None:
        return
    res = resolution if isinstance(resolution, Resolution) else Resolution.from_dict(resolution)
    if res.is_default():
        return
    ip = processor.image_processor
    size = dict(ip.size) if getattr(ip, "size", None) is not None else {}
    size = {k: v for k, v in size.items() if v is not None}
    kind = type(ip).__name__
    if res.min_pixels is not None or res.max_pixels is not None:
        if "shortest_edge" not in size or "longest_edge" not in size or not hasattr(ip, "merge_size"):
            raise ConfigError(f"min_pixels/max_pixels apply to Qwen2-VL-style processors, not {kind}")
        lo = res.min_pixels if res.min_pixels is not None else size["shortest_edge"]
        hi = res.max_pixels if res.max_pixels is not None else size["longest_edge"]
        if lo > hi:
            raise ConfigError(f"min_pixels {lo} > max_pixels {hi}")
        size.update(shortest_edge=lo, longest_edge=hi)
    if res.longest_edge is not None:
        if set(size) != {"longest_edge"}:
            raise ConfigError(f"longest_edge applies to Pixtral-style processors, not {kind} "
                              "(LLaVA-1.5 and Mllama inputs have the vision tower's fixed size)")
        size["longest_edge"] = res.longest_edge
    ip.size = type(ip.size)(**size) if not isinstance(ip.size, dict) else size


def save_resolution(folder: str | os.PathLike, resolution: Resolution | dict) -> Path:
    """Record ``resolution`` in ``config.json`` if the folder has one, else in ``vlmtune.json``.
    Returns the file written."""
    res = resolution if isinstance(resolution, Resolution) else Resolution.from_dict(resolution)
    folder = Path(folder)
    path = folder / CONFIG_FILES[0] if (folder / CONFIG_FILES[0]).is_file() else folder / CONFIG_FILES[1]
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    meta = dict(data.get(META_KEY) or {})
    meta["resolution"] = res.to_dict()
    data[META_KEY] = meta
    write_json(path, data, sort_keys=True)
    return path


def load_resolution(folder: str | os.PathLike) -> Resolution | None:
    """The resolution saved by :func:`save_resolution`, or None if the folder has none."""
    for name in CONFIG_FILES:
        path = Path(folder) / name
        if path.is_file():
            meta = json.loads(path.read_text(encoding="utf-8")).get(META_KEY) or {}
            if "resolution" in meta:
                return Resolution.from_dict(meta["resolution"])
    return None
