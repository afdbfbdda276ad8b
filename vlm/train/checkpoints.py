"""Atomic checkpoints on top of transformers' Trainer, and what ``--resume`` may do with a folder.

Trainer writes ``checkpoint-N/`` file by file. Before it starts we create the folder with
``vlmtune_saving.json``; after it has written everything we fsync the folder's files and atomically
create ``vlmtune_complete.json`` (then drop the first marker). So each ``checkpoint-N`` is

- complete: ``vlmtune_complete.json``: a resume point;
- interrupted: only ``vlmtune_saving.json``: our own save cut short (a crash, even SIGKILL, mid-write);
  ``--resume`` removes it, and says so, and resumes from the previous complete one;
- foreign: neither marker (plain transformers, another tool, or a version of this project that
  wrote no start marker): never deleted; ``--resume`` refuses to run beside it and names it.

Rotation keeps at least two checkpoints (``save_total_limit >= 2``) so the previous one survives.

The completion marker also records what the checkpoint cannot show by itself:

- ``config``: the training config it was trained with (a resume with other data, learning rate,
  seed... is named by :func:`config_changes`);
- ``run``: totals over every segment up to this step (tokens, label tokens, training and wall
  seconds, number of segments), so a resumed run's summary counts the whole run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from vlm.atomic import fsync_tree, write_json
from vlm.errors import VlmError

MARKER = "vlmtune_complete.json"
SAVING = "vlmtune_saving.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")

COMPLETE, INTERRUPTED, FOREIGN = "complete", "interrupted", "foreign"
RUN_TOTALS = ("tokens", "label_tokens", "train_seconds", "wall_seconds", "segments")

# Config keys a resumed run may change without changing what it trains: where and how fast it
# runs, how long, how it logs and saves (the batch is reconciled by vlm.train.distributed).
RESUME_MAY_CHANGE = ("output", "logging", "distributed", "kernels", "model.device", "data.num_workers",
                     "data.pad_to_multiple_of", "training.max_steps", "training.epochs",
                     "training.save_steps", "training.save_total_limit", "training.logging_steps",
                     "training.compile", "training.cuda_graphs", "training.mlp_chunks",
                     "training.gradient_checkpointing", "training.batch_size", "training.grad_accum")


def begin_save(checkpoint_dir: str | os.PathLike, step: int) -> None:
    """Claim ``checkpoint_dir`` as ours before Trainer writes into it."""
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SAVING, {"step": step}, indent=None)


def mark_complete(checkpoint_dir: str | os.PathLike, step: int, record: dict[str, Any] | None = None) -> None:
    folder = Path(checkpoint_dir)
    fsync_tree(folder)
    write_json(folder / MARKER, {"step": step, **(record or {})}, indent=None)
    (folder / SAVING).unlink(missing_ok=True)


def checkpoint_state(path: Path) -> str:
    if (path / MARKER).is_file():
        return COMPLETE
    return INTERRUPTED if (path / SAVING).is_file() else FOREIGN


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path, str]]:
    """(step, path, state) for every checkpoint-N folder, oldest first; state is one of
    ``complete`` / ``interrupted`` / ``foreign`` (see the module docstring)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p, checkpoint_state(p)))
    return sorted(out)


def latest_complete(output_dir: str | os.PathLike, remove_interrupted: bool = True,
                    say=print) -> Path | None:
    """The newest complete checkpoint. Our own interrupted saves are removed (and ``say`` is told);
    a foreign checkpoint folder is a VlmError: Trainer would resume from it or rotate it away."""
    found = checkpoints(output_dir)
    foreign = [p.name for _, p, state in found if state == FOREIGN]
    if foreign:
        raise VlmError(f"--resume: {Path(output_dir)} holds {', '.join(foreign[:3])}"
                       f"{' ...' if len(foreign) > 3 else ''} without {MARKER} (not written by vlmtune, "
                       "or by a version that marked no save in progress); it is left untouched: move "
                       "it out of the output folder, or choose another output folder")
    best = None
    for step, path, state in found:
        if state == COMPLETE:
            best = path
        elif remove_interrupted:
            shutil.rmtree(path, ignore_errors=True)
            say(f"--resume: removed {path}: its save was interrupted (no {MARKER})")
    return best


def checkpoint_record(checkpoint: str | os.PathLike | None) -> dict[str, Any]:
    """What :func:`mark_complete` recorded ({} for None)."""
    if checkpoint is None:
        return {}
    return json.loads((Path(checkpoint) / MARKER).read_text())


def run_totals(record: dict[str, Any]) -> dict[str, float]:
    """Totals of the run up to a checkpoint, from its :func:`checkpoint_record` (zeros for a fresh
    run, ``{}``, or a checkpoint that recorded none)."""
    run = record.get("run") or {}
    return {k: run.get(k, 0) for k in RUN_TOTALS}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = {f"{prefix}.length": len(obj)}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every config value that differs, except :data:`RESUME_MAY_CHANGE`."""
    a, b = _flatten(old), _flatten(new)

    def may_change(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in RESUME_MAY_CHANGE)

    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if not may_change(k) and a.get(k) != b.get(k)]


FINISHED_RUN_FILES = ("adapter", "summary.json")   # what the recipe writes at the end


def finished_run_files(out: Path) -> list[str]:
    """What a finished run left in ``out`` (empty for a fresh or unfinished folder)."""
    return [name for name in FINISHED_RUN_FILES if (out / name).exists()]


def resume_point(out: Path, config: dict[str, Any], resume: bool, say=print) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), after refusing what would overwrite a
    finished run and warning about a config (``config``: as plain data) that differs from the
    checkpoint's. ``say`` prints the warnings (the main process's ``print``)."""
    finished = finished_run_files(out)
    if not resume:
        if any(out.glob("checkpoint-*")):
            raise VlmError(f"{out} already holds checkpoints: pass --resume to continue, or choose another "
                           "output folder")
        if finished:
            raise VlmError(f"{out} holds a finished run ({', '.join(finished)}): a new run would replace it; "
                           "choose another output folder (or move those away)")
        return None
    resume_from = latest_complete(out, say=say)
    if resume_from is None:
        if finished:
            raise VlmError(f"--resume: {out} holds a finished run ({', '.join(finished)}) but no checkpoint "
                           "to continue from; starting over would replace it: choose another output folder")
        say(f"warning: --resume: no complete checkpoint in {out}; starting from step 0")
        return None
    old = checkpoint_record(resume_from).get("config")
    if old is None:
        say(f"warning: --resume: {resume_from} records no config (an older vlmtune): whether data, "
              "learning rate or seed changed cannot be checked")
    else:
        changes = config_changes(old, config)
        if changes:
            say(f"warning: --resume: the config differs from the one {resume_from.name} was trained with; "
                  f"the run continues with the new values: {'; '.join(changes)}")
    return resume_from
