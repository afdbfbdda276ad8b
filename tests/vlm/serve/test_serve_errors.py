"""`vlm serve` failure paths, without vLLM: every one is a clear error and leaves no process behind.

A fake server command (``launcher=``) stands in for vLLM where the point is our process handling
(a server that dies at start-up, one that never becomes healthy, a healthy one that we stop).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from vlm.export.adapter import AdapterError
from vlm.export.check import AdapterRejected
from vlm.serve import ServeError, VllmServer
from vlm.serve.plan import parse_adapter_specs, plan_launch


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie (exited, not reaped by its parent) is gone for our purposes
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def _script(tmp_path, body: str) -> list[str]:
    path = tmp_path / "fake_server.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_port_in_use_is_refused_before_spawning(servable_base, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = VllmServer(str(servable_base), port=port, launcher=_script(tmp_path, "raise SystemExit(9)"))
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is already in use"):
            srv.start()
        assert srv.proc is None  # nothing was started


def test_missing_adapter_folder_and_bad_model(servable_base, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        VllmServer(str(servable_base), adapters={"a": str(tmp_path / "nope")}, launcher=["true"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match="no config.json"):
        VllmServer(str(tmp_path / "empty"), launcher=["true"])
    with pytest.raises(ServeError, match="expected NAME=PATH"):
        parse_adapter_specs(["just-a-path"])
    res = subprocess.run([sys.executable, "-m", "vlm", "serve", str(servable_base), "--adapter",
                          f"a={tmp_path / 'nope'}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_rejected_adapter_refused_before_any_server_starts(servable_base, make_adapter, tmp_path):
    adapter = make_adapter(modules_to_save=["lm_head"])
    marker = tmp_path / "started"
    with pytest.raises(AdapterRejected, match="modules_to_save"):
        VllmServer(str(servable_base), adapters={"a": str(adapter)},
                   launcher=_script(tmp_path, f"open({str(marker)!r}, 'w').write('x')")).start()
    assert not marker.exists()


def test_launch_plan_flags(servable_base, trained_adapter):
    launch = plan_launch(str(servable_base), adapters={"captions": str(trained_adapter)}, port=8123,
                         api_key="sekret", flavour="cpu")
    argv = launch.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in argv
    assert argv[argv.index("--lora-modules") + 1] == f"captions={trained_adapter}"
    assert '"shortest_edge": 3136' in argv[argv.index("--mm-processor-kwargs") + 1]
    # the servable base is a Qwen2-VL: it trains on video, so the server takes one video per request
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image": 1, "video": 1}'
    assert "sekret" not in " ".join(argv) and launch.env["VLLM_API_KEY"] == "sekret"
    assert launch.env["VLLM_TARGET_DEVICE"] == "cpu"
    assert launch.model_names == [servable_base.name, "captions"]


def test_cpu_head_size_checked_before_spawning(tiny_checkpoint):
    zoo = tiny_checkpoint("qwen2_vl")  # 4 heads of 16: vLLM's CPU attention has no kernel for 16
    with pytest.raises(ServeError, match="head size is 16"):
        plan_launch(str(zoo), flavour="cpu")


def test_server_dying_at_startup_gives_its_log(servable_base, tmp_path):
    launcher = _script(tmp_path, """
        import sys
        print("fake vllm: loading model", flush=True)
        print("RuntimeError: cannot load weights from", sys.argv[sys.argv.index("--model") + 1], flush=True)
        sys.exit(3)
    """)
    srv = VllmServer(str(servable_base), launcher=launcher, log_path=tmp_path / "log.txt")
    with pytest.raises(ServeError) as e:
        srv.start()
    msg = str(e.value)
    assert "exited with code 3 during start-up" in msg and "cannot load weights" in msg
    assert _gone(srv.proc.pid)


def test_startup_timeout_kills_the_whole_group(servable_base, tmp_path):
    child_pid = tmp_path / "child.pid"
    launcher = _script(tmp_path, f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(child_pid)!r}, "w").write(str(child.pid))
        time.sleep(300)
    """)
    srv = VllmServer(str(servable_base), launcher=launcher, startup_timeout=4)
    with pytest.raises(ServeError, match="did not answer"):
        srv.start()
    assert _gone(srv.proc.pid) and _gone(int(child_pid.read_text()))


def test_healthy_server_stops_cleanly(servable_base, tmp_path):
    launcher = _script(tmp_path, """
        import http.server, subprocess, sys
        port = int(sys.argv[sys.argv.index("--port") + 1])
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # an engine-like child
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()
            def log_message(self, *a):
                pass
        http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """)
    with VllmServer(str(servable_base), launcher=launcher, startup_timeout=60) as srv:
        assert srv.alive() and srv.url == f"http://127.0.0.1:{srv.port}/v1"
        pgid = srv.proc.pid
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
