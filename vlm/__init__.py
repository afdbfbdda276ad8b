"""vlmtune: fine-tune, evaluate and serve vision-language models fast and in little memory.

Public API:
    vlm.load(path, dtype=..., device=..., quant=...) -> (model, processor)
    vlm.families.get_family(name) / family_for_config(config)
    vlm.zoo.build_tiny(variant, out_dir, seed=0)
"""

from __future__ import annotations

__version__ = "0.1.0"

# Imported eagerly on purpose: the function shares its name with the submodule vlm/load.py, and the
# import system sets ``vlm.load`` to the *module* the first time that submodule loads. Importing it
# here, once, binds the name to the function for good (later imports of the submodule do not rebind).
from vlm.load import load  # noqa: E402

__all__ = ["__version__", "load"]
