"""benchmarks/config_runs.py --tiny: a shipped new-family config, unchanged but for the CPU
overrides, trains a step on a shrunk random model and its adapter loads in plain PEFT."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


sys.path.insert(0, str(REPO / "benchmarks"))

from config_runs import RUNS  # noqa: E402
from random_vlms import SIZES  # noqa: E402

from .._concurrent import Run  # noqa: E402

# one run per new family (random_vlms.SIZES): the sizes of a family shrink to the same tiny model;
# mistral_24b exercises data.longest_edge (Pixtral processor), qwen3_vl_8b min/max_pixels
NEW_FAMILY_RUNS = list({SIZES[size]["zoo"]: run for run, (_, size) in reversed(list(RUNS.items()))
                        if size in SIZES}.values())


@pytest.fixture(scope="module")
def config_runs(request, tmp_path_factory):
    """The selected tests' runs, all started at once (tests/_concurrent.py): on 2 cores the runs of
    the families finish side by side instead of one after the other; each test waits for its own."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    wanted = [item.callspec.params["run"] for item in request.session.items if item.module is request.module]
    runs = {}
    for run in dict.fromkeys(wanted):
        root = tmp_path_factory.mktemp(f"config_run_{run}")
        argv = [sys.executable, REPO / "benchmarks" / "config_runs.py", "--runs", run, "--steps", "1", "--tiny",
                "--root", root]
        runs[run] = (Run(argv, root / "logs", env=env), root)
    yield runs
    for proc, _ in runs.values():
        proc.stop()


@pytest.mark.parametrize("run", NEW_FAMILY_RUNS)
def test_new_family_config_runs_on_a_tiny_model(config_runs, run):
    proc, tmp_path = config_runs[run]
    r = proc.wait(timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert '"adapter_plain_peft": "ok' in r.stdout, r.stdout[-2000:]
    assert (tmp_path / f"run_{run}" / "adapter" / "adapter_config.json").is_file()
