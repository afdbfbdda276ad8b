"""The record of what was rejected: counts per problem, the first few errors for the report, and
(optionally) every rejected record written to a JSONL rejects file. Nothing is dropped silently.

The rejects file is written to ``<path>.tmp`` and moved into place by :meth:`RejectLog.close`
(``os.replace``), so a reader never sees half a file. A run with a rejects path always leaves the
file of *this* run there: empty after a clean run, so a stale file from an earlier run never
survives to be mistaken for this one's. Every line is strict JSON: numbers that JSON cannot hold
(NaN, infinities, which Python's reader accepts in ``.jsonl`` records) are written as strings.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import IO, Any

from vlm.errors import DataError

MAX_KEPT_ERRORS = 200          # errors kept in memory for the printed report
MAX_RECORD_CHARS_IN_REJECTS = 65_536


class RejectLog:
    """Collects rejected records. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike | None = None, keep: int = MAX_KEPT_ERRORS):
        self.path = Path(path) if path is not None else None
        self.keep = keep
        self.counts: Counter[str] = Counter()
        self.errors: list[DataError] = []
        self._fh: IO[str] | None = None
        self._closed = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, err: DataError, raw: Any = None) -> None:
        self.counts[err.code] += 1
        if len(self.errors) < self.keep:
            self.errors.append(err)
        if self.path is not None:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._open()
            entry = {"file": err.file, "index": err.index, "id": err.record_id, "code": err.code,
                     "problem": err.problem}
            record = _json_or_none(raw)
            if record is not None:
                entry["record"] = record
            self._fh.write(json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # backslashreplace: text read from a non-UTF-8 file carries lone surrogates; they are
        # written as \\udcXX escapes (still JSON) instead of failing the write
        self._fh = open(self._tmp_path(), "w", encoding="utf-8", errors="backslashreplace")

    def _tmp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def close(self) -> None:
        """Finish the rejects file (atomically); with no rejects it is an empty file (see above)."""
        if self.path is not None and self._fh is None and not self._closed:
            self._open()
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            os.replace(self._tmp_path(), self.path)

    def __enter__(self) -> "RejectLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> str:
        """One paragraph: how many, which problems, the first errors, where the file is."""
        if not self.total:
            # a stale file from an earlier run was replaced by this run's (empty) one: say so
            return "no records rejected" + (f" ({self.path} is empty)" if self.path is not None else "")
        kinds = ", ".join(f"{code}: {n}" for code, n in self.counts.most_common())
        lines = [f"{self.total} record(s) rejected ({kinds})"]
        lines += [f"  {e}" for e in self.errors[:20]]
        if self.total > 20:
            lines.append(f"  ... and {self.total - 20} more")
        if self.path is not None:
            lines.append(f"  all rejects written to {self.path}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"total": self.total, "by_problem": dict(self.counts),
                "errors": [{"file": e.file, "index": e.index, "id": e.record_id, "code": e.code,
                            "problem": e.problem} for e in self.errors],
                "errors_truncated": self.total > len(self.errors),
                "rejects_file": str(self.path) if self.path is not None else None}


def _json_or_none(raw: Any) -> Any:
    """The raw record if it is small plain JSON (not images in memory), else None."""
    if raw is None:
        return None
    raw = _finite(raw)
    try:
        text = json.dumps(raw, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return raw if len(text) <= MAX_RECORD_CHARS_IN_REJECTS else None


def _finite(value: Any, depth: int = 0) -> Any:
    """``value`` with NaN / infinities as the strings "NaN" / "Infinity" / "-Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if depth > 64:
        return value
    if isinstance(value, dict):
        return {k: _finite(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v, depth + 1) for v in value]
    return value
