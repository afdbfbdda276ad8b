"""vlmtune's own metadata: the facts a trained model needs at serving time, in plain JSON.

Where it lives (DESIGN.md: "metadata rides along in the saved config, never in a pickle"), as the
training recipe (vlm.train.recipe.save_adapter), vlm.quant and vlm.data_formats.resolution write it:
  - an adapter folder: ``vlmtune.json`` = ``{"vlmtune": {...}}`` beside ``adapter_config.json``
    (PEFT's own config is left untouched so PEFT and vLLM read it as always);
  - a full checkpoint (base or merged): the ``"vlmtune"`` key of ``config.json``.

Keys used here: ``resolution`` (``min_pixels``/``max_pixels`` for Qwen2-VL, ``longest_edge`` for
Pixtral: what training resized images to), ``quant`` (the recorded quantization plan of the base
during training: ``policy``, ``protected`` layers, ...), ``base_model``, ``max_images_per_prompt``;
a merged export adds ``merged_from``, ``trained_on_quant``, ``dtype``, ``family``.

Without recorded resolution the pixel limits fall back to the folder's saved image processor
(``processor_config.json`` / ``preprocessor_config.json``).
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
        data = _read_json(folder / ADAPTER_FILE)
        return dict(data.get(CONFIG_KEY, data) or {})
    if (folder / "config.json").is_file():
        return dict(_read_json(folder / "config.json").get(CONFIG_KEY) or {})
    return {}


def _size_in_pixels(folder: Path) -> bool:
    """Whether the folder's family reads the image processor's ``size`` as pixel counts."""
    from vlm.families import family_for_config

    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        from transformers import AutoConfig

        return family_for_config(AutoConfig.from_pretrained(folder)).size_in_pixels
    except Exception:  # noqa: BLE001 - an unknown model type: no family fact to apply
        return False


def processor_pixel_limits(folder: str | Path) -> dict[str, int]:
    """min/max pixels declared by a folder's saved image processor ({} if none or not declared).

    transformers 5 writes ``size: {shortest_edge: min_pixels, longest_edge: max_pixels}`` for the
    families whose ``size`` holds pixel *counts*, not edges (``family.size_in_pixels``: Qwen2-VL,
    Qwen3-VL; read from the folder's config.json); older files write
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
        if "shortest_edge" in size and _size_in_pixels(folder):
            out.setdefault("min_pixels", int(size["shortest_edge"]))
            out.setdefault("max_pixels", int(size["longest_edge"]))
        if out:
            return out
    return {}


def pixel_limits(folder: str | Path) -> dict[str, int]:
    """The image-size limits a folder was trained with: recorded resolution, else its processor."""
    res = read_metadata(folder).get("resolution") or {}
    out = {k: int(v) for k, v in res.items() if k in ("min_pixels", "max_pixels", "longest_edge") and v}
    return out or processor_pixel_limits(folder)


def mm_processor_kwargs(limits: dict[str, int]) -> dict:
    """vLLM ``--mm-processor-kwargs`` for pixel limits (transformers 5 ``size`` conventions).

    Qwen2-VL's processor reads ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``
    (pixel *counts*); Pixtral's reads ``size={"longest_edge": px}`` (an edge length).
    """
    if "min_pixels" in limits or "max_pixels" in limits:
        size = {"shortest_edge": limits.get("min_pixels"), "longest_edge": limits.get("max_pixels")}
        return {"size": {k: v for k, v in size.items() if v}}
    if "longest_edge" in limits:
        return {"size": {"longest_edge": limits["longest_edge"]}}
    return {}


def policy_from_record(quant: object) -> object:
    """A quantization spec that reloads the base exactly as training quantized it.

    The recorded plan (``vlm.quant``'s ``policy`` + ``protected`` + ``protected_int8w``) becomes a
    static policy whose overrides keep the protected layers 16-bit (or int8w), so a ``dynamic`` policy is not re-measured (a new
    calibration could protect different layers). Preset names / None pass through.
    """
    if not isinstance(quant, dict) or "policy" not in quant:
        return quant
    pol = dict(quant["policy"])
    pol["dynamic"] = False
    overrides = dict(pol.get("overrides") or {})
    overrides.update({name: "bf16" for name in quant.get("protected") or []})
    overrides.update({name: "int8w" for name in quant.get("protected_int8w") or []})
    pol["overrides"] = overrides
    return pol
