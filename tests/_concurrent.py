"""Independent subprocess runs of one test started together instead of one after the other.

The CPU suite runs in one pytest process with one torch thread, so on CI's 2 cores a test that runs
``vlm train`` (or a benchmark script) twice, one run after the other, leaves a core idle; two runs
that do not depend on each other, started at once, finish in about the time of the longer one.
Output goes to files, not pipes: a child that fills a pipe nobody reads yet would block.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


class Run:
    """One started subprocess; ``wait()`` -> CompletedProcess with its stdout and stderr as text."""

    def __init__(self, argv: list[str], logs: Path, *, env: dict | None = None, cwd: Path | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.argv = [str(a) for a in argv]
        self._out, self._err = logs / "stdout.txt", logs / "stderr.txt"
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, env=env, cwd=cwd,
                                         stdin=subprocess.DEVNULL)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        return subprocess.CompletedProcess(self.argv, rc, self._out.read_text(errors="replace"),
                                           self._err.read_text(errors="replace"))

    def stop(self) -> None:
        """Kill the run if it is still going (a test that failed before waiting for it)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
