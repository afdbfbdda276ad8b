"""Stream the elements of a JSON array file without loading the whole file.

``json.load`` on a multi-GB ``.json`` array holds the text *and* every parsed record at once. Here a
small text buffer is refilled in chunks and each element is decoded with ``JSONDecoder.raw_decode``
as soon as it is complete, so memory is bounded by the largest single record (plus one chunk).
"""

from __future__ import annotations

import json
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


def iter_json_array(fh: IO[str], source: str | None = None,
                    chunk: int = CHUNK_CHARS) -> Iterator[tuple[Any, int]]:
    """Yield ``(element, line)`` for each element of the top-level JSON array in ``fh``.

    Raises :class:`DataError` (code ``invalid_json``, naming the line and column) on malformed
    JSON; elements before the error have been yielded already.
    """
    decoder = json.JSONDecoder()
    buf = _Buffer(fh, chunk)

    def fail(msg: str, pos: int, index: int | None) -> DataError:
        return DataError(f"invalid JSON at line {buf.line_at(pos)}: {msg}", file=source, index=index,
                         code=problems.INVALID_JSON)

    first = buf.next_char()
    if first != "[":
        raise fail(f"a .json dataset must be an array of records, found {first or 'end of file'!r}"
                   " (one record per line? name the file .jsonl)", buf.pos, None)
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
                ends = " (the file ends inside a record)" if e.pos >= len(buf.text) - 1 else ""
                raise fail(f"{e.msg} (column {e.colno}){ends}", e.pos, index) from None
            if end == len(buf.text) and buf.fill():  # a number/literal may continue in the next chunk
                start = buf.pos
                continue
            break
        yield value, buf.line_at(start)
        buf.pos = end
        index += 1
        sep = buf.next_char()
        if sep == ",":
            buf.pos += 1
        elif sep == "]":
            buf.pos += 1
            break
        else:
            raise fail(f"expected ',' or ']' after record {index - 1}, found {sep or 'end of file'!r}",
                       buf.pos, index)
    if buf.next_char() != "":
        raise fail("extra data after the closing ']'", buf.pos, None)
