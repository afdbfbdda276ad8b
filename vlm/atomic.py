"""Atomic writes: a reader (or a resumed run) sees the old file/folder or the whole new one.

Files go to a temporary sibling, are flushed and fsync'ed, then ``os.replace``d into place.
Folders (checkpoints, adapters, merged models) are written into a temporary sibling folder inside
:func:`replacing_folder` and swapped in only when the block finishes without an exception.

Permissions are those of a plain ``open``/``mkdir`` under the process umask (0644 / 0755 with the
usual 022): ``mkstemp``/``mkdtemp`` create 0600 / 0700, which would hide an adapter or summary from
another user (a vLLM server running under its own account), so the temporaries are widened to that.

A write that fails for lack of space or permission raises :class:`vlm.errors.VlmError` naming the
path and the cause (:func:`explain_os_error`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from vlm.errors import VlmError


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)   # no /proc: the only portable read is set-and-restore
    os.umask(mask)
    return mask


def _default_mode(kind: str) -> int:
    return (0o777 if kind == "dir" else 0o666) & ~current_umask()


def explain_os_error(err: OSError, path: str | os.PathLike, doing: str) -> VlmError:
    """A one-line error for a failed write: the path, what was being done, and the cause."""
    import errno

    causes = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}
    cause = causes.get(err.errno) or err.strerror or str(err)
    return VlmError(f"cannot {doing} {path}: {cause}")


PROBE_BYTES = 64 * 1024


def _probe_write(folder: Path) -> None:
    """Write, fsync and remove a small file in ``folder`` (fsync: delayed allocation reports a full
    disk only there). Raises OSError as the file system does."""
    fd, probe = tempfile.mkstemp(prefix=".vlmtune-write-check.", dir=folder)
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


def ensure_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any long work;
    a read-only, full or forbidden folder is a :class:`VlmError` naming it and the cause."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise explain_os_error(e, folder, f"create the {what}") from e
    try:
        _probe_write(folder)
    except OSError as e:
        raise explain_os_error(e, folder, f"write into the {what}") from e
    return folder


def space_error(folder: str | os.PathLike, target: str | os.PathLike) -> VlmError | None:
    """After a failed save into ``folder``: a VlmError naming ``target`` when the folder cannot take
    a small write now (full disk, quota, read-only), else None (the failure had another cause).
    Writers below torch and safetensors report a full disk in their own words (``unexpected pos``,
    ``I/O error``), so the file system is asked directly."""
    try:
        _probe_write(Path(folder))
    except OSError as e:
        return explain_os_error(e, target, "save")
    return None


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise explain_os_error(e, path, "write") from e
    try:
        os.fchmod(fd, _default_mode("file"))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise explain_os_error(e, path, "write") from e
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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise explain_os_error(e, out, "write") from e
    try:
        os.chmod(tmp, _default_mode("dir"))
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except Exception as e:
        # asked before the partial folder is removed (removing it frees the space again)
        full = e if isinstance(e, VlmError) else space_error(out.parent, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None and full is not e:
            raise full from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
