"""Atomic checkpoints on top of transformers' Trainer.

Trainer writes ``checkpoint-N/`` file by file. We make a checkpoint count only once it is complete:
after Trainer has written everything we fsync the folder's files and atomically create
``vlmtune_complete.json``. Resume picks the newest *complete* checkpoint and removes incomplete ones,
so a crash (even SIGKILL) mid-write leaves the previous checkpoint as the resume point.
Rotation keeps at least two checkpoints (``save_total_limit >= 2``) so the previous one survives.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from vlm.atomic import fsync_tree, write_json

MARKER = "vlmtune_complete.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint_dir: str | os.PathLike, step: int) -> None:
    folder = Path(checkpoint_dir)
    fsync_tree(folder)
    write_json(folder / MARKER, {"step": step}, indent=None)


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every checkpoint-N folder, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p, (p / MARKER).is_file()))
    return sorted(out)


def latest_complete(output_dir: str | os.PathLike, remove_incomplete: bool = True) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a crash mid-write) are removed."""
    best = None
    for step, path, complete in checkpoints(output_dir):
        if complete:
            best = path
        elif remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return best
