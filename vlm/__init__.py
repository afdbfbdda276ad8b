"""vlmtune: fine-tune, evaluate and serve vision-language models fast and in little memory.

Public API (imports are lazy so that ``import vlm`` stays cheap):
    vlm.load(path, dtype=..., device=..., quant=...) -> (model, processor)
    vlm.families.get_family(name) / family_for_config(config)
    vlm.zoo.build_tiny(variant, out_dir, seed=0)
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(*args, **kwargs):
    from vlm.load import load as _load

    return _load(*args, **kwargs)


__all__ = ["__version__", "load"]
