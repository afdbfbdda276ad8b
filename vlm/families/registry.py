"""Find a family by name or from a checkpoint's config. Adding a family = one file in this folder
plus its entry in FAMILY_MODULES and a tiny builder in vlm.zoo."""

from __future__ import annotations

import importlib
from typing import Any

from vlm.errors import UnsupportedModelError
from vlm.families.base import Family

FAMILY_MODULES = ("qwen2_vl", "llava", "pixtral", "mllama", "qwen3_vl", "gemma3", "mistral3")


def all_families() -> dict[str, Family]:
    fams = {}
    for mod in FAMILY_MODULES:
        fam = importlib.import_module(f"vlm.families.{mod}").FAMILY
        fams[fam.name] = fam
    return fams


def video_family_names() -> list[str]:
    """Families whose models take video records (``Family.takes_video``), for error messages."""
    return sorted(f.name for f in all_families().values() if f.takes_video)


def get_family(name: str) -> Family:
    fams = all_families()
    if name not in fams:
        raise UnsupportedModelError(f"unknown family {name!r}; supported: {', '.join(sorted(fams))}")
    return fams[name]


def family_for_config(config: Any) -> Family:
    """The family a transformers config belongs to."""
    for fam in all_families().values():
        if fam.matches(config):
            return fam
    supported = sorted({mt for f in all_families().values() for mt in f.model_types})
    raise UnsupportedModelError(
        f"model_type {getattr(config, 'model_type', None)!r} is not supported; "
        f"supported model_types: {', '.join(supported)}")
