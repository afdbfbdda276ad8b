"""vlm.atomic: files and folders get the permissions a plain open/mkdir would (the umask's), and a
read-only or full file system is an error naming the path and the cause.

Full and read-only file systems are real ones: a small tmpfs mounted in a private mount namespace
(``unshare``) for one subprocess; skipped where the machine allows no such namespace."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vlm.atomic import ensure_writable_folder, replacing_folder, write_json
from vlm.errors import VlmError

from ._tmpfs import needs_mount, run_on_tmpfs


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_and_folders_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        f = write_json(tmp_path / "summary.json", {"a": 1})
        with replacing_folder(tmp_path / "adapter") as tmp:
            write_json(tmp / "vlmtune.json", {})
        plain = tmp_path / "plain"
        plain.mkdir()
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert _mode(f) == _mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert _mode(tmp_path / "adapter") == _mode(plain) == 0o777 & ~umask
    assert _mode(tmp_path / "adapter" / "vlmtune.json") == 0o666 & ~umask


@needs_mount
def test_full_disk_names_the_path(tmp_path):
    mnt = tmp_path / "mnt"
    r = run_on_tmpfs(mnt, "size=256k", f"""
        import torch
        from vlm.atomic import ensure_writable_folder, replacing_folder, write_bytes
        from vlm.errors import VlmError
        out = ensure_writable_folder("{mnt}/run")          # empty: fine
        try:
            write_bytes(out / "big.bin", b"x" * 1_000_000)
        except VlmError as e:
            print("FILE", e)
        try:
            with replacing_folder(out / "adapter") as tmp:  # torch's writer fails its own way
                torch.save(torch.zeros(300_000), tmp / "w.pt")
        except VlmError as e:
            print("FOLDER", e)
        print("LEFT", sorted(p.name for p in out.iterdir()))
        try:
            with open(out / "fill", "wb") as f:
                f.write(b"x" * 1_000_000)
        except OSError:
            pass
        try:
            ensure_writable_folder(out)
        except VlmError as e:
            print("CHECK", e)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["FILE"] == f"cannot write {mnt}/run/big.bin: the disk is full"
    assert lines["FOLDER"] == f"cannot save {mnt}/run/adapter: the disk is full"
    assert lines["LEFT"] == "[]", "no temporary left behind"
    assert lines["CHECK"] == f"cannot write into the output folder {mnt}/run: the disk is full"


@needs_mount
def test_read_only_folder_is_named(tmp_path):
    mnt = tmp_path / "ro"
    r = run_on_tmpfs(mnt, "ro,size=64k", f"""
        from vlm.atomic import ensure_writable_folder
        from vlm.errors import VlmError
        for folder in ("{mnt}", "{mnt}/new/run"):
            try:
                ensure_writable_folder(folder)
            except VlmError as e:
                print(e)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [
        f"cannot write into the output folder {mnt}: the file system is read-only",
        f"cannot create the output folder {mnt}/new/run: the file system is read-only"]


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(VlmError, match=r"cannot create the output folder .*out: "):
        ensure_writable_folder(tmp_path / "out")
