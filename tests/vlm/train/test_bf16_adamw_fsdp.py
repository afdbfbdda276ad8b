"""BF16AdamW on FSDP2's sharded parameters (DTensor row shards), on CPU with 2 gloo processes.

Both processes see the same batch, so the averaged gradient is exactly one process's: a sharded
step must then write exactly what one process writes (the stochastic rounding's random bits follow
the element's index in the whole tensor, vlm.train.bf16_adamw.shard_offset), bit for bit, with
uneven shards (67 rows: 34 + 33) and fp32-master tensors (bias, LayerNorm). 8-bit moments: the
large weight's shards hold whole 256-value blocks, so they are the same blocks as one process's.
The checkpoint form (DTensor states; 8-bit codes with a per-element absmax) resumes bit-exactly
and gathers to one process's states; a one-process checkpoint loads onto the shards (8-bit
moments re-encoded into the shard's blocks: within the 8-bit resolution).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_bf16_adamw_fsdp_worker.py")


def _worker():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("_bf16_adamw_fsdp_worker", WORKER)
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_fsdp") / "rank0.pt"
    r = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert out.is_file(), r.stdout[-2000:] + r.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("setting", ["stochastic/None", "kahan/None", "stochastic/8bit"])
def test_sharded_steps_equal_one_process_and_resume_exactly(sharded, setting):
    w = _worker()
    rounding, state_dtype = setting.split("/")
    state_dtype = None if state_dtype == "None" else state_dtype
    ref, ref_opt = w.one_process(rounding, state_dtype, w.STEPS)
    got = sharded[setting]
    for a, b in zip(got["weights"], ref.parameters()):
        assert torch.equal(a, b.detach()), f"sharded vs one process: max diff {(a - b).abs().max()}"
    for a, b in zip(got["resumed"], ref.parameters()):
        assert torch.equal(a, b.detach()), "sharded resume from the DTensor checkpoint form"
    assert got["state_kinds"] == ["DTensor"], got["state_kinds"]   # DCP reshards them N -> M

    # the checkpoint form gathers to one process's states after SPLIT steps
    from vlm.train.bf16_adamw import decode_8bit

    _, mid = w.one_process(rounding, state_dtype, w.SPLIT)
    mine = mid.state_dict()["state"]
    for i, st in got["states"].items():
        for k in ("exp_avg", "exp_avg_sq", "master", "compensation"):
            if k not in mine[i]:
                assert k not in st
                continue
            a, b = st[k], mine[i][k]
            if b.dtype == torch.uint8:
                a = decode_8bit(a, st[k + "_absmax"], signed=k == "exp_avg")
                b = decode_8bit(b, mine[i][k + "_absmax"], signed=k == "exp_avg")
            assert torch.equal(a, b), (i, k)
    # a one-process checkpoint onto the shards
    for a, b in zip(got["from_one_process"], ref.parameters()):
        if state_dtype is None:
            assert torch.equal(a, b.detach())
        else:
            assert torch.allclose(a.float(), b.detach().float(), rtol=0.02, atol=2e-3), (a - b).abs().max()
    # each process keeps the states of its rows only: about half of one process's
    whole = sum(t.numel() * t.element_size() for s in ref_opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim())
    assert got["local_state_bytes"] <= 0.55 * whole, (got["local_state_bytes"], whole)
