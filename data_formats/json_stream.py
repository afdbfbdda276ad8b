"""Stream the elements of a JSON array file without loading the whole file.

``json.load`` on a multi-GB ``.json`` array holds the text *and* every parsed record at once. Here a
small text buffer is refilled in chunks and each element is decoded with ``JSONDecoder.raw_decode``
as soon as it is complete, so memory is bounded by the largest single record (plus one chunk).
"""

from __future__ import annotations

import json
import re
from typing import IO, Any, Iterator

from vlm.data_formats import problems
from vlm.errors import DataError

CHUNK_CHARS = 1 << 16
MAX_RECORD_CHARS = 256 << 20   # one record bigger than this is surely not a training sample
_WS = " \t\r\n"


class _Buffer:
    """A sliding text window over the file that tracks line numbers of what it dropped."""

    def __init__(self, fh: IO[str], chunk: int):
        self.fh, self.chunk = fh, chunk
        self.text, self.pos, self.lines_dropped, self.eof = "", 0, 0, False

    def fill(self) -> bool:
        """Read one more chunk; False at end of file."""
        if self.eof:
            return False
        more = self.fh.read(self.chunk)
        if not more:
            self.eof = True
            return False
        if self.pos > self.chunk:  # drop what was consumed so the window stays small
            self.lines_dropped += self.text.count("\n", 0, self.pos)
            self.text, self.pos = self.text[self.pos:], 0
        self.text += more
        return True

    def line_at(self, pos: int) -> int:
        return self.lines_dropped + self.text.count("\n", 0, pos) + 1

    def next_char(self) -> str:
        """The next non-whitespace character ('' at end of file), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.fill():
                return ""


NOT_UTF8_CHARS = re.compile("[\udc80-\udcff]")   # what errors="surrogateescape" makes of bad bytes


def _decode_at(buf: _Buffer, decoder: json.JSONDecoder) -> tuple[Any, int]:
    """Decode the JSON value starting at ``buf.pos`` (refilling the window as needed)."""
    start = buf.pos
    while True:
        try:
            value, end = decoder.raw_decode(buf.text, start)
        except json.JSONDecodeError as e:
            # An error near the window's end (a \uXXXX escape or literal cut by the chunk
            # boundary) or an open string may just need more text; elsewhere it is real.
            truncated = e.pos >= len(buf.text) - 16 or e.msg.startswith("Unterminated string")
            if truncated and len(buf.text) - start < MAX_RECORD_CHARS and buf.fill():
                start = buf.pos  # fill() may have shifted the window
                continue
            raise
        if end == len(buf.text) and buf.fill():  # a number/literal may continue in the next chunk
            start = buf.pos
            continue
        return value, end


def _end_of_element(buf: _Buffer) -> int | None:
    """Where the array element starting at ``buf.pos`` ends (the position of the ``,`` or ``]``
    after it), by bracket depth and string state only, so that a syntax error inside one element
    does not lose the elements after it. None when that cannot be told: a string runs past the end
    of its line (JSON strings hold no raw newline: the quotes are unbalanced) or the file ends."""
    i, depth, in_string, escaped = buf.pos, 0, False, False
    while True:
        if i >= len(buf.text):
            offset = i - buf.pos
            if offset > MAX_RECORD_CHARS or not buf.fill():
                return None
            i = buf.pos + offset
            continue
        c = buf.text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
            elif c == "\n":
                return None
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth == 0:
                return i if c == "]" else None
            depth -= 1
        elif c == "," and depth == 0:
            return i
        i += 1


def iter_json_array(fh: IO[str], source: str | None = None,
                    chunk: int = CHUNK_CHARS) -> Iterator[tuple[Any, int]]:
    """Yield ``(element, line)`` for each element of the top-level JSON array in ``fh``.

    A malformed element (a syntax error, nesting too deep for Python's parser, bytes that were not
    UTF-8 when ``fh`` decodes with ``errors="surrogateescape"``) is yielded as a :class:`DataError`
    in place of the element (code ``invalid_json`` / ``not_utf8``, naming line and column), and
    reading goes on after it. When the array cannot be resynced (unbalanced quotes), a last
    DataError (``unreadable_file``) says from which line on the file was not read, and the stream
    ends.
    """
    decoder = json.JSONDecoder()
    buf = _Buffer(fh, chunk)

    def fail(msg: str, pos: int, index: int | None, code: str = problems.INVALID_JSON) -> DataError:
        return DataError(f"invalid JSON at line {buf.line_at(pos)}: {msg}" if code == problems.INVALID_JSON
                         else msg, file=source, index=index, code=code)

    first = buf.next_char()
    if first != "[":
        raise fail(_not_an_array_hint(buf, decoder, first), buf.pos, None)
    buf.pos += 1
    index = 0
    while True:
        c = buf.next_char()
        if c == "]" and index == 0:
            buf.pos += 1
            break
        if c == "":
            raise fail("the array is not closed (file ends early)", buf.pos, index)
        start = buf.pos
        line = buf.line_at(start)
        try:
            value, end = _decode_at(buf, decoder)
            bad = NOT_UTF8_CHARS.search(buf.text, buf.pos, end)
            if bad:
                value = fail(f"record at line {line} is not UTF-8 text (a Latin-1 / cp1252 file?): "
                             "re-save the file as UTF-8", bad.start(), index, problems.NOT_UTF8)
        except (json.JSONDecodeError, RecursionError) as e:
            where = e.pos if isinstance(e, json.JSONDecodeError) else start
            problem = (f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError)
                       else "nested too deeply to parse (a JSON record is never that deep)")
            err = fail(problem, where, index)
            end = _end_of_element(buf)
            if end is None:
                raise DataError(f"{err.problem}; the array cannot be resynced after it, so record "
                                f"{index} and everything after it (from line {line} to the end of the "
                                "file) was not read", file=source, index=index,
                                code=problems.UNREADABLE_FILE) from None
            value = err
        yield value, line
        buf.pos = end
        index += 1
        sep = buf.next_char()
        if sep == ",":
            buf.pos += 1
        elif sep == "]":
            buf.pos += 1
            break
        else:
            raise fail(f"expected ',' or ']' after record {index - 1}, found {sep or 'end of file'!r}; "
                       "the rest of the file was not read", buf.pos, index)
    if buf.next_char() != "":
        raise fail("extra data after the closing ']'", buf.pos, None)


def _not_an_array_hint(buf: _Buffer, decoder: json.JSONDecoder, first: str) -> str:
    """Why a ``.json`` file that is not an array cannot be read, and what to do about it."""
    found = first or "end of file"
    if first == "{":
        try:
            value, end = _decode_at(buf, decoder)
        except (json.JSONDecodeError, RecursionError):
            value, end = None, buf.pos
        buf.pos = end
        if buf.next_char() == "{":
            return ("a .json dataset must be an array of records, but this file holds one record "
                    "per line: name it .jsonl")
        if isinstance(value, dict):
            keys = ", ".join(sorted(map(str, value))[:6])
            return ("a .json dataset must be an array of records, but this file holds one object "
                    f"(keys: {keys}): put the records in a top-level [...] array")
    return f"a .json dataset must be an array of records ([...]), found {found!r}"
