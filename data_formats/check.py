"""``vlm data check`` as a function: validate every record of some files, with token statistics.

Streams each source (bounded memory: counters and a fixed-size sample of lengths only), collects
every bad record in a :class:`RejectLog`, and, given a processor, plans each valid sample to report
text/image token lengths and how many ``max_length`` would truncate or drop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from vlm.data_formats import problems
from vlm.data_formats.images import DEFAULT_MAX_IMAGE_PIXELS
from vlm.data_formats.reader import iter_conversations
from vlm.data_formats.rejects import RejectLog
from vlm.data_formats.sources import source_name
from vlm.data_formats.validate import ImageValidator
from vlm.errors import DataError

LENGTH_SAMPLE = 10_000   # lengths kept for percentiles (reservoir sample: bounded memory)


class _Reservoir:
    """Uniform fixed-size sample of a stream of numbers, plus exact count/min/max/sum."""

    def __init__(self, size: int = LENGTH_SAMPLE, seed: int = 0):
        self.size, self.rng = size, random.Random(seed)
        self.items: list[int] = []
        self.n, self.total, self.lo, self.hi = 0, 0, None, None

    def add(self, x: int) -> None:
        self.n += 1
        self.total += x
        self.lo = x if self.lo is None else min(self.lo, x)
        self.hi = x if self.hi is None else max(self.hi, x)
        if len(self.items) < self.size:
            self.items.append(x)
        else:
            j = self.rng.randrange(self.n)
            if j < self.size:
                self.items[j] = x

    def summary(self) -> dict:
        if not self.n:
            return {"count": 0}
        s = sorted(self.items)

        def pct(p):
            return s[min(len(s) - 1, int(p / 100 * len(s)))]
        return {"count": self.n, "min": self.lo, "mean": round(self.total / self.n, 1),
                "p50": pct(50), "p95": pct(95), "max": self.hi}


@dataclass
class CheckReport:
    files: dict = field(default_factory=dict)          # name -> {"records", "valid", "rejected"}
    rejects: RejectLog = field(default_factory=RejectLog)
    tokens: dict = field(default_factory=dict)          # "text"/"image"/"total" -> summary
    max_length: int | None = None
    would_truncate: int = 0
    would_drop: int = 0

    @property
    def ok(self) -> bool:
        return self.rejects.total == 0

    def as_dict(self) -> dict:
        return {"ok": self.ok, "files": self.files, "tokens": self.tokens,
                "max_length": self.max_length, "would_truncate": self.would_truncate,
                "would_drop": self.would_drop, "rejects": self.rejects.as_dict()}

    def text(self) -> str:
        lines = []
        for name, c in self.files.items():
            if c.get("empty"):
                lines.append(f"{name}: no records (an empty file)")
                continue
            lines.append(f"{name}: {c['records']} records, {c['valid']} valid, {c['rejected']} bad"
                         + ("; the rest of the file could not be read (see below)"
                            if c.get("read_to_end") is False else ""))
        for kind, summ in self.tokens.items():
            if summ.get("count"):
                lines.append(f"{kind} tokens: min {summ['min']}, mean {summ['mean']}, p50 {summ['p50']}, "
                             f"p95 {summ['p95']}, max {summ['max']}")
        if self.max_length is not None:
            lines.append(f"max_length {self.max_length}: {self.would_truncate} sample(s) would be "
                         f"truncated (text only), {self.would_drop} dropped")
        lines.append(self.rejects.summary() if self.rejects.total else "all records valid" + (
            f" ({self.rejects.path} is empty)" if self.rejects.path is not None else ""))
        return "\n".join(lines)


def check_data(sources: Sequence[Any], *, image_root: str | None = None, collator=None,
               rejects: RejectLog | None = None,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> CheckReport:
    """Validate every record of ``sources``; with ``collator``, also plan lengths.

    Samples that ``collator.plan`` refuses (too long for text-only truncation, nothing to train
    on) count as ``would_drop`` and are listed as rejects too.
    """
    report = CheckReport(rejects=rejects or RejectLog())
    report.max_length = getattr(collator, "max_length", None)
    validator = ImageValidator(max_image_pixels)
    text_len, image_len, total_len = _Reservoir(), _Reservoir(), _Reservoir()
    for source in sources:
        name = source_name(source)
        before = report.rejects.total
        empty_before = report.rejects.counts[problems.EMPTY_SOURCE]
        unread_before = report.rejects.counts[problems.UNREADABLE_FILE]
        valid = 0
        for conv in iter_conversations(source, image_root=image_root, on_error="skip",
                                       rejects=report.rejects, validator=validator):
            if collator is not None:
                try:
                    plan = collator.plan(conv)
                except DataError as e:
                    report.rejects.add(e)
                    report.would_drop += 1
                    continue
                text_len.add(plan.text_tokens)
                image_len.add(plan.image_tokens)
                total_len.add(plan.length)
                report.would_truncate += plan.truncated
            valid += 1
        bad = report.rejects.total - before
        empty = report.rejects.counts[problems.EMPTY_SOURCE] - empty_before
        report.files[name] = {"records": valid + bad - empty, "valid": valid, "rejected": bad - empty}
        if empty:
            report.files[name]["empty"] = True
        if report.rejects.counts[problems.UNREADABLE_FILE] > unread_before:
            report.files[name]["read_to_end"] = False
    if collator is not None:
        report.tokens = {"text": text_len.summary(), "image": image_len.summary(),
                         "total": total_len.summary()}
    report.rejects.close()
    return report
