"""FSDP2 loading: a process never holds the whole model and its shards at once.

Measured on 2 x H200 (Qwen2-VL-7B, 16-bit LoRA): the load peak per GPU was 23.47 GiB, the whole
15.59 GiB model plus its 7.8 GiB half: accelerate's ``fsdp2_prepare_model`` keeps
``model.state_dict()`` (every unsharded weight) alive until the last unit is sharded.
``vlm.train.fsdp_units.shard_model`` shards unit by unit and lets each unit's unsharded weights go
as its ``fully_shard`` returns. Here, in 2 gloo processes on CPU, the bytes of live tensors are
counted after every ``fully_shard`` call (``_fsdp_load_peak_worker.live_tensor_bytes``: exact
storage sizes, no RSS): they must never rise above what the process held before the first call
(the model as loaded, the data, the LoRA weights) by more than a few percent of the model, where
accelerate's cut added half of it. Training must still match one process step for step.

The run uses ``distributed.fsdp_frozen_towers: blocks`` (a unit per vision block, chained by forward
prefetch; the default layout's sharded runs are test_multi_gpu_tiny's and test_cross_resume's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ._tiny_run import write_config
from .test_distributed import ATOL, RTOL, _env

WORKER = Path(__file__).with_name("_fsdp_load_peak_worker.py")


def test_fsdp2_sharding_frees_each_unit_and_matches_one_process(tmp_path, tiny_checkpoint):
    from vlm.data_formats.synthetic import generate
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=8, seed=5)
    (tmp_path / "one").mkdir()
    one = write_config(tmp_path / "one", ck, data.sharegpt_json, max_steps=2, save_steps=10, batch_size=4)
    ref = train(load_config(one), progress=False).summary
    (tmp_path / "two").mkdir()
    two = write_config(tmp_path / "two", ck, data.sharegpt_json, max_steps=2, save_steps=10, batch_size=2)
    r = subprocess.run([sys.executable, str(WORKER), str(two), str(tmp_path / "two"), "blocks"], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        whole, before, calls = got["whole"], got["before_first"], got["calls"]
        assert len(calls) >= 4, calls   # decoder units, vision blocks, tail, root
        units, layout = got["sharding"]["unit_classes"], got["sharding"]["layout"]
        assert units.get("Qwen2VLVisionBlock", 0) >= 2 and "Qwen2VisionTransformerPretrainedModel" not in units, units
        blocks = units["Qwen2VLVisionBlock"]
        # each block starts the next one's all-gather, the last block the first decoder unit's
        assert layout["forward_prefetch"].startswith(f"{blocks} units"), layout
        assert f"{blocks} vision block units" in layout["forward_prefetch"], layout
        over = max(calls) - before
        assert over <= 0.05 * whole, (
            f"rank {rank}: {over} bytes of tensors above the model as loaded while sharding "
            f"({over / whole:.0%} of the {whole}-byte model): unsharded weights kept beside their shards")
        # sharded: the process ends holding about half the model less than it loaded
        assert calls[-1] <= before - 0.4 * whole, (calls[-1], before, whole)
        for (step, a), (_, b) in zip(got["loss_history"], ref["loss_history"], strict=True):
            assert a == pytest.approx(b, rel=RTOL, abs=ATOL), f"step {step}: FSDP2 {a} vs one process {b}"


def test_fsdp_on_gpus_stages_a_16bit_lora_model_in_host_memory():
    """Where ``vlm.load`` puts the model (``staging_device``): host memory only for FSDP on GPUs with a
    16-bit LoRA model (each unit then reaches its GPU as it is sharded); a 4-bit policy quantizes as
    it moves to CUDA and method full / projector are not staged: they load on the GPU as before."""
    from vlm.train.config import parse_config
    from vlm.train.distributed import staging_device

    from .test_distributed import MINIMAL

    def where(device, strat, *overrides):
        return staging_device(parse_config(dict(MINIMAL), list(overrides)), device, strat)

    assert where("cuda:1", "fsdp", "quant=bf16") == "cpu"
    assert where("cuda:1", "fsdp") == "cpu"   # no quant policy: 16-bit
    assert where("cuda:1", "fsdp", "quant=nf4") == "cuda:1"
    assert where("cuda:1", "fsdp", "quant=bf16", "method=full") == "cuda:1"
    assert where("cuda:1", "ddp", "quant=bf16") == "cuda:1"
    assert where("cuda:0", "single", "quant=bf16") == "cuda:0"
    assert where("cpu", "fsdp", "quant=bf16") == "cpu"
