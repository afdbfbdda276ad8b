"""benchmarks/cuda_graphs_repro.py on CPU: the GPU repro's `vlm train` path runs end to end (CPU torch
runs the compiled layers without CUDA graphs, so every variant must train)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cuda_graphs_repro_runs_the_shipped_variant_on_cpu():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cuda_graphs_repro.py"), "--device", "cpu",
                        "--variants", "shipped", "--steps", "2"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("shipped:")]
    assert len(line) == 1 and line[0].startswith("shipped: ok, 2 steps, losses ") and "fallback None" in line[0]
