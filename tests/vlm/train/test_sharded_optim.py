"""bitsandbytes' 8-bit AdamW on FSDP2-sharded parameters (vlm.train.sharded_optim), on CPU.

Two gloo processes shard a small model with ``fully_shard`` (FSDP2 runs on CPU with gloo) and step
``shard_local(bnb.optim.AdamW8bit)``; one process steps plain ``bnb.optim.AdamW8bit`` on the same
unsharded model. When every shard holds whole 256-value blocks the two must agree bit for bit
(the blocks are the same blocks); plain AdamW8bit on the shards is the failure this guards
("mixed torch.Tensor and DTensor"). The checkpoint form (dense moments as DTensors) gathers to
the unsharded optimizer's moments and loads back into 8-bit state within its resolution.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_sharded_optim_worker.py")


def _worker_module():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("_sharded_optim_worker", WORKER)
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, wrap):
    out = tmp_path / "rank0.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(WORKER), str(out), "wrap" if wrap else "plain"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert out.is_file(), r.stderr[-3000:]
    return torch.load(out)


def _reference():
    import bitsandbytes as bnb

    from vlm.train.sharded_optim import _dense_moments

    w = _worker_module()
    model = w._model()
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    w._steps(model, opt)
    return model, [_dense_moments(opt.state[p]) for p in model.parameters()]


def test_plain_bitsandbytes_8bit_fails_on_fsdp2_shards(tmp_path):
    got = _run(tmp_path, wrap=False)
    assert "DTensor" in got.get("error", ""), got


def test_shard_local_adamw8bit_equals_unsharded_and_checkpoints_portably(tmp_path):
    got = _run(tmp_path, wrap=True)
    assert "error" not in got, got
    ref_model, ref_moments = _reference()
    for w, r in zip(got["weights"], ref_model.parameters()):
        assert torch.equal(w, r.detach()), (w - r).abs().max()
    assert got["state_kind"] == "DTensor"            # sharded like the parameter, so DCP reshards it
    for i, (m, v) in enumerate(ref_moments):
        gm, gv, step = got["moments"][i]
        assert step == 3
        assert torch.equal(gm.reshape(m.shape), m) and torch.equal(gv.reshape(v.shape), v)
    assert got["reload_rel_change"] <= 0.01


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_are_shard_local_under_every_strategy(tmp_path, optim):
    from transformers import TrainingArguments

    from vlm.train.distributed import optimizer_cls_and_kwargs

    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True, report_to="none")
    cls, kwargs = optimizer_cls_and_kwargs(args, "fsdp")
    assert cls.__name__.startswith("ShardLocal") and kwargs["lr"] == args.learning_rate
    # outside FSDP the same class (bitsandbytes' own step; loads an FSDP2 checkpoint's dense moments)
    assert optimizer_cls_and_kwargs(args, "ddp")[0].__name__.startswith("ShardLocal")
    args = TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", use_cpu=True, report_to="none")
    # torch's AdamW under FSDP2 steps each process's local shards (vlm.train.local_step); elsewhere the
    # Trainer's own choice stands
    assert optimizer_cls_and_kwargs(args, "fsdp")[0].__name__ == "LocalShardAdamW"
    assert optimizer_cls_and_kwargs(args, "ddp") is None


def test_shard_local_steps_like_bitsandbytes_without_a_device_wait_per_parameter(monkeypatch):
    """Same weights and moments as bitsandbytes' own AdamW8bit, bit for bit, on plain tensors; and
    none of its per-parameter ``sync_gpu`` calls (one ``torch.cuda.synchronize`` per parameter on a
    GPU), counted here through the function bitsandbytes' step calls."""
    import bitsandbytes as bnb
    import bitsandbytes.optim.optimizer as bnb_optimizer

    from vlm.train.sharded_optim import _dense_moments, shard_local

    waits = []
    real = bnb_optimizer.sync_gpu
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: (waits.append(1), real(t)))
    w = _worker_module()
    results = []
    for cls in (bnb.optim.AdamW8bit, shard_local(bnb.optim.AdamW8bit)):
        model = w._model()
        opt = cls(model.parameters(), lr=1e-2, min_8bit_size=0)
        waits.clear()
        w._steps(model, opt)
        results.append(([p.detach().clone() for p in model.parameters()],
                        [_dense_moments(opt.state[p]) for p in model.parameters()], len(waits)))
    (ref_w, ref_m, ref_waits), (got_w, got_m, got_waits) = results
    assert ref_waits == 3 * 2 and got_waits == 0        # 3 steps x 2 parameters
    for a, b in zip(got_w, ref_w):
        assert torch.equal(a, b)
    for (gm, gv), (rm, rv) in zip(got_m, ref_m):
        assert torch.equal(gm, rm) and torch.equal(gv, rv)
