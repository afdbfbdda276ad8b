"""``VllmServer``: vLLM's OpenAI server for a model + LoRA adapters, as a context manager.

    with VllmServer("runs/base", adapters={"captions": "runs/demo/adapter"}) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key=srv.api_key or "none")
        client.chat.completions.create(model="captions", messages=[...])

``start()`` validates everything (plan.py), checks the port, spawns the server in its own process
group and waits for ``/health`` while watching the child; ``stop()`` ends the whole group. A failed
start stops what it started before raising, so no process outlives the error.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vlm.serve.plan import Launch, ServeError, plan_launch
from vlm.serve.process import ensure_port_free, free_port, spawn, stop_group, tail, wait_healthy


class VllmServer:
    """One vLLM OpenAI-compatible server process (group). See module docstring."""

    def __init__(self, model: str, *, adapters: dict[str, str] | None = None, host: str = "127.0.0.1",
                 port: int | None = None, api_key: str | None = None, served_name: str | None = None,
                 dtype: str = "auto", max_images: int | None = None, max_model_len: int | None = None,
                 extra_args: list[str] | tuple[str, ...] = (), startup_timeout: float = 600.0,
                 log_path: str | Path | None = None, launcher: list[str] | None = None,
                 python: str | None = None):
        """``port`` None/0 picks a free port. ``launcher`` replaces ``[python, -m, vllm...api_server]``
        (used to run another server command with the same arguments, e.g. in tests)."""
        self.host = host
        self.port = int(port) if port else free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
        self.api_key = api_key
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="vlm-serve-")) / "vllm.log"
        self.launch: Launch = plan_launch(model, adapters=adapters, host=host, port=self.port, api_key=api_key,
                                          served_name=served_name, dtype=dtype, max_images=max_images,
                                          max_model_len=max_model_len, extra_args=extra_args, python=python,
                                          flavour="custom" if launcher else None)
        if launcher:
            self.launch.argv = [*launcher, *self.launch.argv[3:]]
        self.proc = None
        self.startup_seconds: float | None = None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return self.root + "/v1"

    @property
    def model_names(self) -> list[str]:
        return self.launch.model_names

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "VllmServer":
        if self.proc is not None:
            raise ServeError("server already started")
        ensure_port_free(self.host, self.port)
        t0 = time.monotonic()
        self.proc = spawn(self.launch.argv, self.launch.env, self.log_path)
        try:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
            wait_healthy(self.proc, self.root + "/health", self.log_path, self.startup_timeout, headers)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        return tail(self.log_path, n)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
