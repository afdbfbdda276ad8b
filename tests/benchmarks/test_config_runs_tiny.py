"""benchmarks/config_runs.py --tiny: a shipped new-family config, unchanged but for the CPU
overrides, trains a step on a shrunk random model and its adapter loads in plain PEFT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


sys.path.insert(0, str(REPO / "benchmarks"))

from config_runs import RUNS  # noqa: E402
from random_vlms import SIZES  # noqa: E402

# one run per new family (random_vlms.SIZES): the sizes of a family shrink to the same tiny model;
# mistral_24b exercises data.longest_edge (Pixtral processor), qwen3_vl_8b min/max_pixels
NEW_FAMILY_RUNS = list({SIZES[size]["zoo"]: run for run, (_, size) in reversed(list(RUNS.items()))
                        if size in SIZES}.values())


@pytest.mark.parametrize("run", NEW_FAMILY_RUNS)
def test_new_family_config_runs_on_a_tiny_model(tmp_path, run):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "config_runs.py"), "--runs", run,
                        "--steps", "1", "--tiny", "--root", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert '"adapter_plain_peft": "ok' in r.stdout, r.stdout[-2000:]
    assert (tmp_path / f"run_{run}" / "adapter" / "adapter_config.json").is_file()
