"""vlm.train.local_step: torch's AdamW on FSDP2's local shards steps exactly as on the DTensors,
keeps DTensor moments in its state (checkpoints unchanged), and dispatches no DTensor operator.

Two gloo processes shard a LoRA-like module (a frozen base, trainable factors, one with 5 rows:
uneven shards) with ``fully_shard``; torch's foreach AdamW and ``local_shard_step(AdamW)`` take 3
steps on the same gradients, then reload their state_dict into a fresh optimizer and step once more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_local_step_worker.py")


def test_local_shard_adamw_matches_torch_on_dtensors_without_dtensor_dispatch(tmp_path):
    out = tmp_path / "rank0.pt"
    r = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert out.is_file(), r.stderr[-3000:]
    got = torch.load(out)
    ref, local = got["torch"], got["local"]
    for a, b in zip(local["weights"], ref["weights"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert local["moments"].keys() == ref["moments"].keys()
    for i, (m, v, step) in local["moments"].items():
        torch.testing.assert_close(m, ref["moments"][i][0], rtol=0, atol=0)
        torch.testing.assert_close(v, ref["moments"][i][1], rtol=0, atol=0)
        assert step == ref["moments"][i][2] == 3.0
    assert local["state_kinds"] == ref["state_kinds"] == ["DTensor"]
    assert min(ref["dtensor_ops_per_step"]) > 0, "the DTensor path this replaces"
    assert local["dtensor_ops_per_step"] == [0, 0, 0], local["dtensor_ops_per_step"]

    # gradient clipping: the same norm and clipped gradients as torch's on the DTensors, no DTensor op
    (norm_ref, grads_ref, ops_ref), (norm, grads, ops) = got["clip"]["torch"], got["clip"]["local"]
    assert norm == pytest.approx(norm_ref, rel=1e-6) and norm_ref > 0.5, (norm, norm_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert ops_ref > 0 and ops == 0, (ops_ref, ops)
