"""Errors a person can act on.

Every error the project raises on purpose derives from :class:`VlmError`. The CLI prints its message
as one line (no traceback unless ``--debug``) and exits non-zero.
"""

from __future__ import annotations


class VlmError(Exception):
    """Base class: the message alone must tell the user what is wrong and what to do."""

    exit_code = 1


class ConfigError(VlmError):
    """A config key or value is invalid (names the key and the allowed values)."""


class UnsupportedModelError(VlmError):
    """The checkpoint's model_type belongs to no registered family."""


class DataError(VlmError):
    """A dataset record is bad. Carries file, record index/id and problem."""

    def __init__(self, problem: str, *, file: str | None = None, index: int | None = None,
                 record_id: str | None = None, code: str = "invalid"):
        self.problem = problem
        self.file = file
        self.index = index
        self.record_id = record_id
        self.code = code
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.index is not None:
            where.append(f"record {self.index}")
        if self.record_id is not None:
            where.append(f"id={self.record_id!r}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.problem}" if prefix else self.problem
