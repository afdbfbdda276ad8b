"""Where llama.cpp's conversion code and runtime come from, and the errors when they are missing.

The converter (``convert_hf_to_gguf.py`` with its ``conversion`` package and its own ``gguf-py``)
and the CLIP encoder script for LLaVA-1.5 ship inside the ``llama-cpp-python`` source distribution,
pinned below; ``make test-gguf`` downloads and unpacks it into a cache folder and builds the runtime
(``llama_cpp`` with ``mtmd``) from the same sources. Nothing of it is copied into this repository:
we run its scripts and import its package from the unpacked folder.

The folder is found from ``VLM_LLAMA_CPP_SRC`` (the unpacked ``vendor/llama.cpp``, or the sdist
root above it), else the cache ``VLM_GGUF_CACHE`` / ``~/.cache/vlmtune/gguf``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from vlm.errors import VlmError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_DIR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
SETUP_HINT = ("run `make gguf-deps` (downloads llama-cpp-python "
              f"{LLAMA_CPP_PYTHON_VERSION}'s source, builds it for CPU, installs it into .venv)")


class GgufToolchainMissing(VlmError):
    """llama.cpp's converter or runtime is not where the export looks for it."""


def cache_dir() -> Path:
    return Path(os.environ.get("VLM_GGUF_CACHE") or Path.home() / ".cache" / "vlmtune" / "gguf").expanduser()


def llama_cpp_source() -> Path:
    """The unpacked ``vendor/llama.cpp`` folder holding ``convert_hf_to_gguf.py``."""
    env = os.environ.get("VLM_LLAMA_CPP_SRC")
    candidates = []
    if env:
        root = Path(env).expanduser()
        candidates += [root, root / "vendor" / "llama.cpp"]
    candidates.append(cache_dir() / SDIST_DIR / "vendor" / "llama.cpp")
    for c in candidates:
        if (c / "convert_hf_to_gguf.py").is_file() and (c / "conversion").is_dir():
            return c.resolve()
    where = ", ".join(str(c) for c in candidates)
    raise GgufToolchainMissing(f"llama.cpp's converter (convert_hf_to_gguf.py) not found in {where}: {SETUP_HINT}, "
                               "or set VLM_LLAMA_CPP_SRC to an unpacked llama.cpp source folder")


def converter_script() -> Path:
    return llama_cpp_source() / "convert_hf_to_gguf.py"


def clip_encoder_script() -> Path:
    """llama.cpp's CLIP + LLaVA-projector converter (``legacy-models/convert_image_encoder_to_gguf.py``)."""
    path = llama_cpp_source() / "tools" / "mtmd" / "legacy-models" / "convert_image_encoder_to_gguf.py"
    if not path.is_file():
        raise GgufToolchainMissing(f"{path} is missing from the llama.cpp sources: {SETUP_HINT}")
    return path


def converter_env() -> dict[str, str]:
    """Environment for the converter subprocesses: its own ``gguf-py`` first on the path (the
    registry's gguf 0.19.0 lacks ``gguf.LazyChunkedTensor``, which this converter uses)."""
    src = llama_cpp_source()
    env = dict(os.environ)
    paths = [str(src / "gguf-py"), str(src)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def require_runtime(what: str) -> None:
    """Raise unless the ``llama_cpp`` package (built with ``mtmd``) imports; ``what`` says why it is needed."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise GgufToolchainMissing(f"{what} needs llama.cpp's runtime (the llama_cpp package), which is not "
                                   f"installed: {SETUP_HINT}")
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.mtmd_cpp  # noqa: F401
    except Exception as e:  # a build without its shared libraries raises OSError/RuntimeError here
        raise GgufToolchainMissing(f"{what}: llama_cpp is installed but does not load ({e}): {SETUP_HINT}") from e
