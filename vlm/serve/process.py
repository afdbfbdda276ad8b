"""Run a server as a child process group: free-port checks, health wait, clean stop, no orphans.

The child gets its own session (``start_new_session``), so it and everything it spawns (vLLM's
engine core, its resource tracker) share one process group that we signal as a whole: SIGTERM,
then SIGKILL after a grace period. On Linux the child also gets ``PR_SET_PDEATHSIG`` so that if
*we* are killed outright (SIGKILL, OOM) the server is told to stop too. Ctrl-C in a terminal reaches
only our foreground group; our ``finally`` stops the child's group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from vlm.serve.plan import ServeError


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_port_free(host: str, port: int) -> None:
    """Raise a clear ServeError if something already listens on host:port (checked before spawning)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"port {port} on {host} is already in use ({e.strerror}): stop whatever listens "
                             "there or pick another with --port (--port 0 picks a free one)") from None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def tail(path: Path, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=n)).rstrip()
    except OSError:
        return ""


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``argv`` in its own session with stdout+stderr to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab", buffering=0)
    try:
        return subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    except OSError as e:
        raise ServeError(f"could not start {argv[0]}: {e}") from None
    finally:
        log.close()  # the child holds its own copy of the descriptor


def _exit_text(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = (" (illegal instruction: vLLM picked kernels this CPU lacks; on CPU, VLLM_TARGET_DEVICE=cpu "
                "must reach the server)") if -code == signal.SIGILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float,
                 headers: dict[str, str] | None = None) -> float:
    """Poll ``url`` until HTTP 200 while watching ``proc``; return seconds waited.

    A child that exits → ServeError with its exit status and last log lines. Timeout → the same
    (the caller stops the process group).
    """
    t0 = time.monotonic()
    req = urllib.request.Request(url, headers=headers or {})
    while True:
        code = proc.poll()
        if code is not None:
            raise ServeError(f"the vLLM server {_exit_text(code)} during start-up. Last lines of {log_path}:\n"
                             f"{tail(log_path)}")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() - t0 > timeout:
            raise ServeError(f"the vLLM server did not answer {url} within {timeout:.0f} s (raise "
                             f"--startup-timeout if the model is big). Last lines of {log_path}:\n{tail(log_path)}")
        time.sleep(0.5)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL what is left after ``grace`` seconds."""
    pgid = proc.pid  # start_new_session: the child leads its own group
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(pgid):
                break
            time.sleep(0.1)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
