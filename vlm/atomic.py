"""Atomic writes: a reader (or a resumed run) sees the old file/folder or the whole new one.

Files go to a temporary sibling, are flushed and fsync'ed, then ``os.replace``d into place.
Folders (checkpoints, adapters, merged models) are written into a temporary sibling folder inside
:func:`replacing_folder` and swapped in only when the block finishes without an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **kwargs) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """``fig.savefig`` through a temporary file of the same suffix (matplotlib picks the format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, **savefig_kwargs)
    os.replace(tmp, path)
    return path


def fsync_tree(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing_folder(out: str | os.PathLike) -> Iterator[Path]:
    """``with replacing_folder(out) as tmp: write into tmp`` → ``out`` appears complete, or not at all.

    An existing ``out`` is replaced only after the new one is fully written (and fsync'ed); on an
    exception the temporary folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
