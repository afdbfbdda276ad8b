"""vlm.train.startup_clock: the import clock charges each package its own time, and leaves the
modules it times as they would be; cache bypass reasons are kept without reaching any log handler."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap


def test_import_clock_charges_each_package_its_own_time(tmp_path):
    # outer imports inner on the way: outer's own work 0.2 s, inner's 0.4 s
    (tmp_path / "outer_pkg").mkdir()
    (tmp_path / "outer_pkg" / "__init__.py").write_text("import time\nimport inner_pkg.sub\ntime.sleep(0.2)\n")
    (tmp_path / "inner_pkg").mkdir()
    (tmp_path / "inner_pkg" / "__init__.py").write_text("import time\ntime.sleep(0.1)\n")
    (tmp_path / "inner_pkg" / "sub.py").write_text("import time\ntime.sleep(0.3)\n")
    (tmp_path / "inner_pkg" / "data.txt").write_text("payload")
    code = textwrap.dedent("""
        import importlib.resources, json, sys
        from vlm.train.startup_clock import install_import_clock, import_split, imports_without_pyc
        clock = install_import_clock()
        import outer_pkg
        import inner_pkg
        split = import_split()
        print(json.dumps({"no_pyc": imports_without_pyc(), "outer": clock.seconds["outer_pkg"], "inner": clock.seconds["inner_pkg"],
                          "split": split, "loader": type(outer_pkg.__loader__).__name__,
                          "spec_loader": type(inner_pkg.__spec__.loader).__name__,
                          "resource": importlib.resources.files("inner_pkg").joinpath("data.txt").read_text()}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.2 <= got["outer"] < 0.35 and 0.4 <= got["inner"] < 0.55   # exclusive: inner's 0.4 s not in outer's
    assert got["split"]["inner_pkg"] >= got["split"]["outer_pkg"] and got["split"]["python_start"] >= 0
    # new source files have no .pyc yet: Python compiled all three (outer, inner, inner.sub) here
    assert got["no_pyc"]["modules"] >= 3 and got["no_pyc"]["s"] > 0.55
    # the modules keep their real loader: inspect, pkgutil and importlib.resources work as without the clock
    assert got["loader"] == got["spec_loader"] == "SourceFileLoader" and got["resource"] == "payload"


def test_cache_bypass_reasons_are_kept_and_not_logged():
    from vlm.train.startup_clock import _BypassCapture, compile_split, watch_cache_bypasses

    name = "torch._functorch._aot_autograd.autograd_cache"
    logger = logging.getLogger(name)
    level, filters = logger.level, list(logger.filters)
    for f in filters:
        if isinstance(f, _BypassCapture):
            logger.removeFilter(f)
    logger.setLevel(logging.WARNING)   # torch's level for it without TORCH_LOGS: INFO lines are not made
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()        # shows everything that reaches it
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        watch_cache_bypasses()
        logger.info("Bypassing autograd cache due to: %s", "Can't cache HigherOrderOperator: test_op")
        logger.info("some other info line")
        logger.warning("a warning shows as before")
        reasons = compile_split()["cache_bypass_reasons"]
        assert "Can't cache HigherOrderOperator: test_op" in reasons["aot_autograd"]
        assert [r.getMessage() for r in seen] == ["a warning shows as before"]   # INFO stays unshown
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_compile_workers_start_before_the_first_graph(monkeypatch):
    """On a GPU the recipe starts inductor's compile pool before the model loads (CPU: never).
    Asked here as for a GPU, with two workers: the pool comes up though nothing was compiled
    (torch alone starts it at the first graph)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.async_compile import AsyncCompile, shutdown_compile_workers

    from vlm.train.compile import compile_workers_ready, start_compile_workers

    monkeypatch.setenv("TORCH_WARM_POOL", "1")
    shutdown_compile_workers()   # no pool from an earlier test in this process
    with inductor_config.patch(compile_threads=2):
        try:
            assert not start_compile_workers("cpu") and compile_workers_ready() is None
            assert start_compile_workers("cuda:0")
            AsyncCompile.wait_pool_ready(timeout=120)
            assert compile_workers_ready() is True
        finally:
            shutdown_compile_workers()


def test_a_python_without_bytecode_cache_is_named_with_the_fix():
    """The H200 image compiled 2,360 modules from source in every process (11 s of each startup):
    the startup lines say so and how to fix it; a few of our own fresh modules say nothing."""
    from vlm.train.recipe import startup_lines

    base = {"imports_s": 15.7, "load_s": 3.0, "imports_split": {"torch._inductor": 1.7}}
    many = startup_lines({**base, "imports_without_pyc": {"modules": 2360, "s": 11.1}})
    assert any("PYTHONPYCACHEPREFIX" in line and "every run pays it" in line for line in many)
    few = startup_lines({**base, "imports_without_pyc": {"modules": 12, "s": 0.2}})
    assert "12 modules had no .pyc" in "\n".join(few)
    assert not any("PYTHONPYCACHEPREFIX" in line for line in few)


def test_step_clock_splits_a_phase_and_says_when_it_waited(tmp_path):
    # a phase of three steps: waiting 0.6 s (no CPU), a first import (0.3 s of its own), CPU work
    (tmp_path / "late_pkg").mkdir()
    (tmp_path / "late_pkg" / "__init__.py").write_text("import time\ntime.sleep(0.3)\n")
    code = textwrap.dedent("""
        import json, time
        from vlm.train.startup_clock import StepClock, describe_steps, install_import_clock
        install_import_clock()
        clock = StepClock()
        time.sleep(0.6); clock.mark("wait")
        import late_pkg; clock.mark("first_import")
        t = time.process_time()
        while time.process_time() - t < 0.1:
            pass
        clock.mark("work")
        split = clock.split()
        print(json.dumps({"split": split, "line": describe_steps("phase", split)}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    split, line = got["split"], got["line"]
    assert split["wait_s"] >= 0.6 and split["first_import_s"] >= 0.3 and split["work_s"] >= 0.1
    assert abs(split["wait_s"] + split["first_import_s"] + split["work_s"] - split["wall_s"]) < 0.01
    assert 0.1 <= split["cpu_s"] < split["wall_s"] - 0.8   # sleeping costs no CPU: the clock tells them apart
    assert 0.3 <= split["imports_in_phase"]["late_pkg"] < 0.45 and split["imports_in_phase"]["s"] >= 0.3
    assert line.startswith(f"startup: phase {split['wall_s']:.2f} s = wait ")
    assert "first imports" in line and "late_pkg" in line and "the rest waited" in line


def test_traced_frames_are_described_by_code_with_recompile_reasons():
    from vlm.train.startup_clock import describe_frames

    frames = [{"code": "_checkpointed_call (compile.py:74)", "dynamo_s": 0.5, "recompile": None},
              {"code": "forward (modeling_qwen2_vl.py:466)", "dynamo_s": 0.25, "recompile": None},
              {"code": "_checkpointed_call (compile.py:74)", "dynamo_s": 0.5,
               "recompile": "0/0: tensor 'args[0]' size mismatch at index 1. expected 64, actual 96\nmore"}]
    assert describe_frames(frames) == ("_checkpointed_call (compile.py:74) x2 1.0 s; "
                                       "forward (modeling_qwen2_vl.py:466) x1 0.2 s; recompiled: 0/0: tensor "
                                       "'args[0]' size mismatch at index 1. expected 64, actual 96")
