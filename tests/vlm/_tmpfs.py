"""Real full and read-only file systems for tests: a small tmpfs mounted in a private mount
namespace (``unshare -rm``) for one subprocess, invisible to everything else; no cleanup needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _private_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _private_mount_works(),
                                 reason="no private mount namespace (unshare -rm) on this machine")


def run_on_tmpfs(mount: Path, options: str, code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run Python ``code`` with a fresh tmpfs (``options``, e.g. ``size=256k`` or ``ro``) on
    ``mount``, visible only to that process."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o {options} tmpfs "{mount}" && exec "{sys.executable}" -c "$0"'
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, env=env)
