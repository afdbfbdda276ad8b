"""Multi-process training on CPU: 2 gloo processes (DDP, launched by `vlm train --nproc 2` through
accelerate) match one process with the same global batch, and their checkpoint resumes on 1 process.

Why the losses can match almost exactly: one optimizer step consumes the same 4 samples of the same
seeded order on 1 process (batch 4) and on 2 (batch 2 each: accelerate hands process r the r-th
per-process batch). Each process's loss is its label-token sum divided by the label tokens of the
*whole* global batch (Trainer's ``num_items_in_batch`` with ``average_tokens_across_devices``) times
the process count, and DDP averages gradients, so the gradient is that of the global per-token mean
whatever the split — even when the two halves hold different numbers of label tokens (a plain
per-process mean would weight them wrongly). What differs is float rounding: other matmul shapes
and padding per half, and a reduction order over gloo. In fp32 over 4 steps of Adam this stays
near 1e-7 relative (measured); the stated tolerance is rel 1e-4 / abs 1e-5 per logged loss.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ._tiny_run import write_config
from vlm.errors import VlmError
from vlm.train.config import parse_config
from vlm.train.distributed import META, World, reconcile_resume, strategy

RTOL, ATOL = 1e-4, 1e-5
MINIMAL = {"model": "some/model", "data": {"train": ["train.jsonl"]}}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop("TRITON_INTERPRET", None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_strategy_auto_and_explicit(monkeypatch):
    cfg = parse_config(dict(MINIMAL))
    assert strategy(cfg, World(0, 0, 1)) == "single"
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert strategy(cfg, World(0, 0, 2)) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")   # accelerate launch --use_fsdp
    assert strategy(cfg, World(0, 0, 2)) == "fsdp"
    assert strategy(parse_config(dict(MINIMAL), ["distributed.strategy=ddp"]), World(0, 0, 2)) == "ddp"


def test_resume_on_other_process_count_keeps_global_batch(tmp_path):
    ck = tmp_path / "checkpoint-6"
    ck.mkdir()
    (ck / META).write_text(json.dumps({"world_size": 4, "per_device_batch_size": 2, "grad_accum": 1,
                                       "global_batch": 8}))
    cfg = parse_config(dict(MINIMAL), ["training.batch_size=2"])
    note = reconcile_resume(ck, cfg, World(0, 0, 1))
    assert cfg.training.grad_accum == 4 and "grad_accum 1 → 4" in note
    assert reconcile_resume(ck, cfg, World(0, 0, 1)) is None            # already consistent
    with pytest.raises(VlmError, match="batch_size × grad_accum × 3 = 8"):
        reconcile_resume(ck, parse_config(dict(MINIMAL), ["training.batch_size=2"]), World(0, 0, 3))


def test_nproc_command_is_accelerate_launch():
    from argparse import Namespace

    from vlm.train.launch import accelerate_command

    cmd = accelerate_command(Namespace(nproc=2, config="c.yaml", overrides=["lora.r=4"], resume=True))
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("-m", 3):] == ["-m", "vlm", "train", "c.yaml", "lora.r=4", "--resume"]


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_and_resume_on_one(tmp_path, tiny_checkpoint):
    from vlm.data_formats.synthetic import generate
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=16, seed=5)
    steps = 4  # 16 samples / global batch 4: one epoch, no partial batch

    # reference: 1 process, batch 4 (in this process: no extra interpreter start-up)
    (tmp_path / "one").mkdir()
    one = write_config(tmp_path / "one", ck, data.sharegpt_json, max_steps=steps, save_steps=2, batch_size=4)
    ref = train(load_config(one), progress=False).summary

    # 2 processes × batch 2 through `vlm train --nproc 2` (accelerate launch, gloo)
    (tmp_path / "two").mkdir()
    two = write_config(tmp_path / "two", ck, data.sharegpt_json, max_steps=steps, save_steps=2, batch_size=2)
    r = subprocess.run([sys.executable, "-m", "vlm", "train", str(two), "--nproc", "2"], env=_env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("trained 4 steps on 2 processes (ddp)") == 1, "one report, from rank 0"
    got = json.loads((tmp_path / "two" / "out" / "summary.json").read_text())
    assert got["processes"] == 2 and got["strategy"] == "ddp"
    assert len(got["peak_memory_bytes_per_process"]) == 2
    assert got["tokens"] == ref["tokens"] and got["label_tokens"] == ref["label_tokens"], \
        "both runs saw exactly the same samples"
    assert [s for s, _ in got["loss_history"]] == list(range(1, steps + 1))
    for (step, a), (_, b) in zip(got["loss_history"], ref["loss_history"]):
        assert a == pytest.approx(b, rel=RTOL, abs=ATOL), f"step {step}: 2 processes {a} vs 1 process {b}"
    ckpt = tmp_path / "two" / "out" / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth", META} <= {p.name for p in ckpt.iterdir()}

    # the 2-process checkpoint at step 2 resumes on 1 process (batch 2: grad_accum becomes 2)
    out = tmp_path / "resumed" / "out"
    out.mkdir(parents=True)
    shutil.copytree(ckpt, out / "checkpoint-2")
    cfg = load_config(two, [f"output={out}"])
    res = train(cfg, resume=True, progress=False).summary
    assert cfg.training.grad_accum == 2
    assert res["resumed_from"].endswith("checkpoint-2")
    for (step, a), (_, b) in zip(res["loss_history"][2:], ref["loss_history"][2:]):
        assert a == pytest.approx(b, rel=RTOL, abs=ATOL), f"step {step}: resumed on 1 {a} vs 1 process {b}"
    assert [s for s, _ in res["loss_history"]] == list(range(1, steps + 1))


def test_fsdp_arguments_shard_fully_and_checkpoint_with_dcp():
    from vlm.train.distributed import training_arguments

    cfg = parse_config(dict(MINIMAL), ["distributed.strategy=fsdp"])
    for device, backend in (("cuda", "nccl"), ("cpu", "gloo")):   # CPU: FSDP2 over gloo (fsdp_on_cpu)
        kw = training_arguments(cfg, "fsdp", device)
        assert kw["fsdp"] is True and kw["fsdp_config"]["version"] == 2 and kw["ddp_backend"] == backend
        assert kw["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"   # DCP: reshards N -> M
    assert training_arguments(parse_config(dict(MINIMAL)), "ddp", "cpu")["ddp_backend"] == "gloo"


def test_one_process_on_a_multi_gpu_host_trains_on_one_device_not_dataparallel(tmp_path):
    """transformers' Trainer wraps the model in nn.DataParallel when args.n_gpu > 1 and nothing was
    launched; ``one_device_per_process`` must bring n_gpu to 1 (and say how to use --nproc) for a
    single process, and leave launched runs alone. n_gpu is what Trainer reads; on this CPU machine
    the multi-GPU count is set the way TrainingArguments' device setup sets it on such a host."""
    from transformers import Trainer, TrainingArguments

    from vlm.train.distributed import World, one_device_per_process

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    _ = args.device
    args._n_gpu = 2                     # what _setup_devices records on a host with 2 visible GPUs
    assert one_device_per_process(args, "ddp", World(0, 0, 2)) is None and args.n_gpu == 2
    note = one_device_per_process(args, "single", World())
    assert args.n_gpu == 1 and "--nproc 2" in note
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    assert not isinstance(trainer._wrap_model(trainer.model), torch.nn.DataParallel)
