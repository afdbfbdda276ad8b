"""Model families: one file each; the registry finds a family from a checkpoint config."""

from vlm.families.base import COMPONENTS, Family, ImageWrap, KeyRename, LanguageKernels, VllmSupport
from vlm.families.registry import all_families, family_for_config, get_family

__all__ = ["COMPONENTS", "Family", "ImageWrap", "KeyRename", "LanguageKernels", "VllmSupport", "all_families", "family_for_config", "get_family"]
