"""Where records come from: one function that streams raw records from any supported source.

Supported: ``.json`` (an array, streamed), ``.jsonl``, ``.parquet`` (row batches), a
``datasets.save_to_disk`` folder (memory-mapped Arrow), an in-memory ``datasets.Dataset`` (its
image column may hold PIL images or bytes), or a plain list of dicts. Every source yields
:class:`RawRecord`s; a record that cannot even be decoded comes out as a :class:`DataError` in the
stream and reading goes on: ``.jsonl`` with the next line, ``.json`` after the bad element (found
by bracket depth; when even that fails, a last error says from which line on nothing was read),
parquet with nothing (a corrupt row group loses the rows from there on, and the error says so).

Text files are UTF-8, with or without a byte-order mark; bytes that are not UTF-8 make the record
they are in a ``not_utf8`` error (a Latin-1 file is named as such, not a crash).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vlm.data_formats import problems
from vlm.data_formats.json_stream import iter_json_array
from vlm.errors import DataError

PARQUET_BATCH_ROWS = 256
BOM = b"\xef\xbb\xbf"


@dataclass
class RawRecord:
    """One undecoded record and where it came from (``line`` for JSON text files)."""

    data: Any
    source: str
    index: int
    line: int | None = None


def source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return getattr(source, "vlm_name", None) or f"<{type(source).__name__}>"


def default_image_root(source: Any) -> str:
    """Relative image paths resolve against the data file's folder (a dataset folder: itself)."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        return str(p if p.is_dir() else p.parent)
    return os.getcwd()


def iter_raw_records(source: Any) -> Iterator[RawRecord | DataError]:
    """Stream the records of ``source`` (a path, ``datasets.Dataset`` or list of dicts)."""
    name = source_name(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DataError("data file not found", file=name, code=problems.MISSING_FILE)
        if path.is_dir():
            yield from _iter_dataset(_load_from_disk(path, name), name)
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path, name)
        elif path.suffix == ".json":
            yield from _iter_json(path, name)
        elif path.suffix == ".parquet":
            yield from _iter_parquet(path, name)
        else:
            raise DataError(f"unsupported data file type {path.suffix!r}: use .json (array), .jsonl, "
                            ".parquet or a datasets save_to_disk folder", file=name, code=problems.UNSUPPORTED_SOURCE)
    elif isinstance(source, (list, tuple)):
        for i, rec in enumerate(source):
            yield RawRecord(rec, name, i)
    elif hasattr(source, "features") and hasattr(source, "__iter__"):
        yield from _iter_dataset(source, name)
    else:
        raise DataError(f"cannot read data from a {type(source).__name__}", code=problems.UNSUPPORTED_SOURCE)


def _iter_jsonl(path: Path, name: str) -> Iterator[RawRecord | DataError]:
    index = 0
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if not raw.strip():
                continue
            try:
                yield RawRecord(json.loads(raw.decode("utf-8")), name, index, line_no)
            except UnicodeDecodeError as e:
                yield DataError(f"line {line_no} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1}; a Latin-1 / cp1252 file?): re-save the file "
                                "as UTF-8", file=name, index=index, code=problems.NOT_UTF8)
            except json.JSONDecodeError as e:
                yield DataError(f"invalid JSON at line {line_no}, column {e.colno}: {e.msg}",
                                file=name, index=index, code=problems.INVALID_JSON)
            except RecursionError:
                yield DataError(f"invalid JSON at line {line_no}: nested too deeply to parse (a "
                                "JSON record is never that deep)", file=name, index=index,
                                code=problems.INVALID_JSON)
            index += 1


def _iter_json(path: Path, name: str) -> Iterator[RawRecord | DataError]:
    # utf-8-sig: a byte-order mark is skipped; surrogateescape: non-UTF-8 bytes reach the array
    # reader as lone surrogates, which it reports per record instead of failing the whole file.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
        try:
            for index, (value, line) in enumerate(iter_json_array(fh, name)):
                yield value if isinstance(value, DataError) else RawRecord(value, name, index, line)
        except DataError as e:
            yield e


def _iter_parquet(path: Path, name: str) -> Iterator[RawRecord | DataError]:
    import pyarrow
    import pyarrow.parquet as pq

    index = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield RawRecord(row, name, index)
                index += 1
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        where = f"rows from {index} on" if index else "the file"
        yield DataError(f"corrupt parquet file: {where} could not be read ({type(e).__name__}: {e})",
                        file=name, index=index if index else None, code=problems.UNREADABLE_FILE)


def _load_from_disk(path: Path, name: str):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise DataError(f"not a readable datasets folder ({type(e).__name__}: {e})", file=name,
                        code=problems.UNREADABLE_FILE) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise DataError(f"the dataset folder holds splits {', '.join(ds)}: point at one split's "
                        "folder", file=str(path), code=problems.UNSUPPORTED_SOURCE)
    return ds


def _iter_dataset(ds, name: str) -> Iterator[RawRecord]:
    for index, row in enumerate(ds):
        yield RawRecord(row, name, index)
