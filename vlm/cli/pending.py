"""Shared body for subcommands whose issue has not landed: say so and exit 2."""

from __future__ import annotations

import argparse

from vlm.errors import NotLandedError


def configure_pending(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run_pending(name: str, issue: int) -> int:
    raise NotLandedError(f"`vlm {name}` is not implemented yet (issue #{issue} has not landed)")
