"""LoRA on a base with int8w layers (the default ``dynamic`` policy's protection tier,
vlm.quant.int8_linear) under FSDP2: 2 gloo processes (``vlm train --nproc 2
distributed.strategy=fsdp``) against one process at the same global batch, on the tiny Qwen2-VL.

An ``Int8Linear`` keeps its frozen int8 codes as a Parameter and its float32 row steps as a buffer:
FSDP2 shards the codes with the rest of the unit (each process holds half the model's parameter
bytes) and all-gathers them for the forward; nothing of them is reduced (no gradient). The loss
curve matches one process within test_distributed's tolerance, and the adapter records the plan
(its int8w layers) so a reload quantizes the same layers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ._tiny_run import write_config
from .test_distributed import ATOL, RTOL, _env

STEPS = 2
# the default policy with a budget the tiny model's groups fit in int8w (its 1.08x holds only a few)
QUANT = {"preset": "dynamic", "budget": "1.1x"}


def test_int8w_base_trains_sharded_under_fsdp2_like_one_process(tmp_path, tiny_checkpoint):
    from vlm.data_formats.synthetic import generate
    from vlm.export.metadata import read_metadata
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=8, seed=5)          # 2 steps of 4 samples
    (tmp_path / "one").mkdir()
    one = write_config(tmp_path / "one", ck, data.sharegpt_json, max_steps=STEPS, save_steps=10, batch_size=4,
                       quant=QUANT)
    ref = train(load_config(one), progress=False).summary
    (tmp_path / "two").mkdir()
    two = write_config(tmp_path / "two", ck, data.sharegpt_json, max_steps=STEPS, save_steps=10, batch_size=2,
                       quant=QUANT)
    r = subprocess.run([sys.executable, "-m", "vlm", "train", str(two), "distributed.strategy=fsdp", "--nproc", "2"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = json.loads((tmp_path / "two" / "out" / "summary.json").read_text())
    assert got["strategy"] == "fsdp"

    int8w = read_metadata(tmp_path / "two" / "out" / "adapter")["quant"]["protected_int8w"]
    assert len(int8w) >= 4, "the plan stores layers int8w"
    assert int8w == read_metadata(tmp_path / "one" / "out" / "adapter")["quant"]["protected_int8w"]

    # the int8 codes are parameters of the loaded base (FSDP2 shards parameters, not buffers), and
    # FSDP2's whole is that base plus the fp32 LoRA weights: each process holds half of it
    import torch

    from vlm.load import load

    base, _ = load(ck, dtype="fp32", device="cpu", quant=QUANT)
    plan = base.vlm_quant_plan
    assert sorted(plan.int8w()) == sorted(int8w)
    codes = sum(p.numel() for p in base.parameters() if p.dtype == torch.int8)
    assert codes == sum(plan.layers[n].out_features * plan.layers[n].in_features for n in int8w) > 0
    whole = got["sharding"]["parameter_bytes_whole"]
    assert whole == sum(p.numel() * p.element_size() for p in base.parameters()) + 4 * got["trainable_parameters"]
    assert got["parameter_bytes_per_process"] == [whole // 2, whole // 2], "every weight sharded, int8 codes too"

    ref_loss, loss = dict(ref["loss_history"]), dict(got["loss_history"])
    assert sorted(loss) == list(range(1, STEPS + 1))
    for step in loss:
        assert loss[step] == pytest.approx(ref_loss[step], rel=RTOL, abs=ATOL), f"step {step}"
    assert loss[STEPS] < loss[1], "the adapter learns"
