"""Cache of sensitivity-analysed (``dynamic``) plans: the analysis runs once per checkpoint, calibration
and policy, not at every ``vlm train``.

The analysis loads the 16-bit model, runs the calibration batches and measures every candidate
layer: on a 7B model most of the startup of a QLoRA run. What it decides — the set of layers kept
16-bit and the analysis record — depends only on

- the checkpoint: ``config.json``'s content and each weight file's name, size and mtime (saving a
  checkpoint again changes them);
- the calibration: the policy's sample count and seed, and the source (a file's path, size and mtime;
  the built-in synthetic set; in-memory batches are not cached);
- the policy's fields (the sensitivity metric among them: ``propagated`` and ``output`` plans are
  separate entries) and the load dtype;
- the analysis code (:data:`ANALYSIS_VERSION`, raised whenever the measurement or the ranking changes).

Those form the key (SHA-256). A hit resolves the plan from a meta-device skeleton with the cached
protected set (no weights read) and says so; ``vlm load``'s verification then checks the loaded
model against it as for a fresh plan. Entries are small JSON files written atomically under
``$VLM_CACHE_DIR/quant_plans`` (default ``~/.cache/vlmtune/quant_plans``); ``VLM_QUANT_PLAN_CACHE=0``
turns the cache off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

ANALYSIS_VERSION = 5   # 2: calibration prompts carry one BOS (templates that write it get none added)
#                        3: default metric ``propagated``; the record carries the analysis timing
#                        4: protection tiers (``protected_int8w``)
#                        5: tiered outliers by group score; propagated chains stop where a
#                           ModuleList is no stack (Qwen3-VL DeepStack mergers)


def cache_root() -> Path:
    base = os.environ.get("VLM_CACHE_DIR") or Path.home() / ".cache" / "vlmtune"
    return Path(base) / "quant_plans"


def enabled() -> bool:
    return os.environ.get("VLM_QUANT_PLAN_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _checkpoint_identity(source: str) -> list | None:
    root = Path(source)
    config = root / "config.json"
    if not config.is_file():
        return None    # a hub id or anything else we cannot fingerprint: not cached
    weights = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    return [config.read_text(), [[p.name, *_file_identity(p)[1:]] for p in weights]]


def _calibration_identity(calibration: Any) -> Any:
    if calibration is None:
        return "synthetic"
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        return _file_identity(path) if path.is_file() else None
    if isinstance(calibration, dict) and "path" in calibration:
        path = Path(calibration["path"])
        if not path.is_file():
            return None
        return {**{k: str(v) for k, v in calibration.items() if k != "path"}, "file": _file_identity(path)}
    return None    # in-memory batches: no stable identity


def key(source: str, policy, calibration: Any, dtype) -> str | None:
    """The cache key of an analysis, or None where it cannot be fingerprinted (then not cached)."""
    if not enabled():
        return None
    checkpoint, calib = _checkpoint_identity(source), _calibration_identity(calibration)
    if checkpoint is None or calib is None:
        return None
    fields = json.dumps(dataclasses.asdict(policy), sort_keys=True, default=str)
    text = json.dumps([ANALYSIS_VERSION, checkpoint, calib, fields, str(dtype)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read(cache_key: str | None) -> dict | None:
    """``{"protected": [...], "protected_int8w": [...], "analysis": {...}}`` of a cached plan, or None (absent or unreadable)."""
    if cache_key is None:
        return None
    path = cache_root() / f"{cache_key}.json"
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("protected"), list):
        return None
    return entry


def write(cache_key: str | None, plan) -> Path | None:
    """Store ``plan``'s protected layers and analysis; a failed write only costs the next analysis."""
    if cache_key is None:
        return None
    from vlm.atomic import write_text

    from vlm.quant.policy import INT8W

    entry = {"protected": sorted(n for n, lp in plan.layers.items() if lp.reason == "protected"
                                 and lp.precision != INT8W),
             "protected_int8w": sorted(n for n, lp in plan.layers.items() if lp.reason == "protected"
                                       and lp.precision == INT8W),
             "analysis": plan.analysis, "analysis_version": ANALYSIS_VERSION}
    try:
        return write_text(cache_root() / f"{cache_key}.json", json.dumps(entry, default=float))
    except OSError as e:
        print(f"warning: quant plan cache not written ({e})")
        return None
