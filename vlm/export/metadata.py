"""vlmtune's own metadata: the facts a trained model needs at serving time, in plain JSON.

Where it lives (DESIGN.md: "metadata rides along in the saved config, never in a pickle"):
  - an adapter folder: ``vlmtune.json`` beside ``adapter_config.json`` (PEFT's own config is left
    untouched so PEFT and vLLM read it as they always do);
  - a full checkpoint (base or merged): the ``"vlmtune"`` key of ``config.json`` (transformers keeps
    unknown config keys, so a merged model round-trips it).

Keys (all optional): ``min_pixels`` / ``max_pixels`` (the image resolution range trained with),
``max_images_per_prompt``, ``quant`` (the base's quantization policy during training: a preset name
or dict), ``dtype``, ``family``, ``base_model``, ``merged_from``.

When a folder carries no metadata the pixel limits fall back to its saved image processor
(``processor_config.json`` / ``preprocessor_config.json``), so a plain checkpoint serves with the
resolution its processor declares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm.errors import VlmError

ADAPTER_FILE = "vlmtune.json"
CONFIG_KEY = "vlmtune"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VlmError(f"{path} is not valid JSON: {e}") from None


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The vlmtune metadata of an adapter or checkpoint folder ({} when there is none)."""
    folder = Path(folder)
    if (folder / ADAPTER_FILE).is_file():
        return dict(_read_json(folder / ADAPTER_FILE))
    if (folder / "config.json").is_file():
        return dict(_read_json(folder / "config.json").get(CONFIG_KEY) or {})
    return {}


def processor_pixel_limits(folder: str | Path) -> dict[str, int]:
    """min/max pixels declared by a folder's saved image processor ({} if none or not declared).

    transformers 5 writes ``size: {shortest_edge: min_pixels, longest_edge: max_pixels}`` for the
    Qwen2-VL family (its ``size`` holds pixel *counts*, not edges); older files write
    ``min_pixels`` / ``max_pixels`` directly.
    """
    folder = Path(folder)
    for name in PROCESSOR_FILES:
        if not (folder / name).is_file():
            continue
        data = _read_json(folder / name)
        ip = data.get("image_processor", data)
        out = {}
        if "min_pixels" in ip and ip["min_pixels"]:
            out["min_pixels"] = int(ip["min_pixels"])
        if "max_pixels" in ip and ip["max_pixels"]:
            out["max_pixels"] = int(ip["max_pixels"])
        size = ip.get("size") or {}
        if "Qwen2VL" in str(ip.get("image_processor_type", "")) and "shortest_edge" in size:
            out.setdefault("min_pixels", int(size["shortest_edge"]))
            out.setdefault("max_pixels", int(size["longest_edge"]))
        if out:
            return out
    return {}


def pixel_limits(folder: str | Path) -> dict[str, int]:
    """The pixel limits a folder was trained with: metadata first, then its saved processor."""
    meta = read_metadata(folder)
    out = {k: int(meta[k]) for k in ("min_pixels", "max_pixels") if meta.get(k)}
    return out or processor_pixel_limits(folder)
