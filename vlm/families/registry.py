"""Find a family by name or from a checkpoint's config. Adding a family = one file in this folder
that defines ``FAMILY`` (found by listing the package, no table to edit) and a tiny builder in vlm.zoo."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from vlm.errors import UnsupportedModelError
from vlm.families.base import Family

NOT_FAMILIES = ("base", "registry")   # the package's own modules


@functools.lru_cache(maxsize=1)
def family_modules() -> tuple[str, ...]:
    """The modules of this package that declare a family, in name order."""
    import vlm.families as package

    return tuple(sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                        if m.name not in NOT_FAMILIES and not m.name.startswith("_")))


def all_families() -> dict[str, Family]:
    fams: dict[str, Family] = {}
    for mod in family_modules():
        fam = getattr(importlib.import_module(f"vlm.families.{mod}"), "FAMILY", None)
        if not isinstance(fam, Family):
            raise TypeError(f"vlm/families/{mod}.py defines no FAMILY record (every module there but "
                            f"{', '.join(NOT_FAMILIES)} is a family)")
        if fam.name in fams:
            raise ValueError(f"two family files declare the family name {fam.name!r} (one is {mod}.py)")
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
