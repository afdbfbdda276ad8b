"""The installed package: namespaced top-level folders and the CPU-only torchvision fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_top_level_folders_only_import_inside_vlm(tmp_path):
    # From outside the repository (the cwd is not on sys.path there), transformers' probe for
    # Hugging Face's `kernels` package must not find ours.
    for bare in ("kernels", "data_formats"):
        result = _python(f"import {bare}", tmp_path)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (bare, result.stderr)
    result = _python("import eval", tmp_path)
    assert result.returncode != 0
    code = ("import vlm.kernels, vlm.data_formats, vlm.eval; "
            "print(vlm.kernels.__file__); print(vlm.data_formats.__file__); print(vlm.eval.__file__)")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    files = [Path(line) for line in result.stdout.split()]
    assert files == [REPO / "kernels" / "__init__.py", REPO / "data_formats" / "__init__.py",
                     REPO / "eval" / "__init__.py"]


def test_torchvision_fix_has_nothing_left_to_do(tmp_path):
    script = REPO / "vlm" / "install" / "torchvision_cpu_fix.py"
    result = subprocess.run([sys.executable, str(script), "--python", sys.executable, "--check"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout, result.stdout
    # In this process: torch is already imported, so this costs no extra interpreter start.
    import torch
    import torchvision  # noqa: F401
    from torchvision.transforms import v2

    assert v2.Resize(8)(torch.zeros(3, 16, 16)).shape == (3, 8, 8)
