"""Import shim for machines where the repo is not pip-installed (the GPU device): with
PYTHONPATH=<repo>:<repo>/benchmarks/kernels, map vlm.kernels / vlm.data_formats / vlm.eval to their
top-level folders exactly as pyproject's package-dir does. Never used on installed checkouts."""

import importlib.abc
import importlib.util
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MAP = {"vlm.kernels": "kernels", "vlm.data_formats": "data_formats", "vlm.eval": "eval"}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        for pkg, folder in _MAP.items():
            if name == pkg or name.startswith(pkg + "."):
                rel = name[len(pkg):].lstrip(".").replace(".", os.sep)
                base = os.path.join(_REPO, folder, rel)
                if os.path.isdir(base):
                    return importlib.util.spec_from_file_location(
                        name, os.path.join(base, "__init__.py"), submodule_search_locations=[base])
                if os.path.isfile(base + ".py"):
                    return importlib.util.spec_from_file_location(name, base + ".py")
        return None


sys.meta_path.insert(0, _Finder())
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
