"""--resume across strategies and process counts: FSDP2 on 2 gloo processes ⇄ 1 process, on CPU.

One run of each kind, all on packed token-budget rows (``data.max_tokens_per_batch``) and
bitsandbytes' 8-bit AdamW (LoRA r=64, so the 64 × 64 adapter matrices hold 8-bit blockwise states;
the 32 × 64 ones stay 32-bit, below bitsandbytes' ``min_8bit_size``):

- reference: 1 process, 2 packed rows per step, 4 steps, checkpoints at 2 and 4;
- FSDP2: ``vlm train --nproc 2 distributed.strategy=fsdp`` (1 row per process: the same global
  batch); equal losses (why they can be: test_distributed's docstring) and the same tokens; its
  checkpoint is DCP folders;
- the FSDP2 checkpoint at step 2 resumed by 1 process (grad_accum 1 → 2) and the 1-process
  checkpoint at step 2 resumed by FSDP2 on 2 processes: steps 3–4 continue the reference.

Tolerance: rel 1e-4 / abs 1e-5 per logged loss (test_distributed's). Measured: ≤ 3e-6 relative; a
resume through the 8-bit states re-quantizes the moments (vlm.train.sharded_optim), ~2e-6 at step 4.
A resume that loaded the adapter but not the optimizer state gave 6.4764 instead of 6.5424 at step 4
(1 %: Adam restarts); one that refused (the code before) fails outright.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ._tiny_run import write_config
from .test_distributed import ATOL, RTOL, _env
from vlm.errors import VlmError

STEPS = 4
EIGHT_BIT = {"training.optimizer": "adamw_8bit", "lora.r": 64, "lora.alpha": 128,
             "data.max_tokens_per_batch": 256}


def _fsdp(config, *extra, resume=False):
    cmd = [sys.executable, "-m", "vlm", "train", str(config), "distributed.strategy=fsdp", *extra, "--nproc", "2"]
    r = subprocess.run(cmd + (["--resume"] if resume else []), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _close(got, ref, steps, what):
    got, ref = dict(got), dict(ref)
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=RTOL, abs=ATOL), f"step {step}: {what} {got[step]} vs {ref[step]}"


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_on_one_process_and_back(tmp_path, tiny_checkpoint):
    from vlm.data_formats.synthetic import generate
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=48, seed=5)   # 8 packed rows of <= 256 tokens: 4 steps of 2

    (tmp_path / "one").mkdir()
    one = write_config(tmp_path / "one", ck, data.sharegpt_json, max_steps=STEPS, save_steps=2,
                       batch_size=2, extra=EIGHT_BIT)
    ref = train(load_config(one), progress=False).summary
    assert ref["data"]["token_budget"]["packed"] and ref["data"]["token_budget"]["rows"] == 8

    (tmp_path / "two").mkdir()
    two = write_config(tmp_path / "two", ck, data.sharegpt_json, max_steps=STEPS, save_steps=2,
                       batch_size=1, extra=EIGHT_BIT)
    _fsdp(two)
    got = json.loads((tmp_path / "two" / "out" / "summary.json").read_text())
    assert got["strategy"] == "fsdp" and got["processes"] == 2
    assert got["tokens"] == ref["tokens"], "each process its own packed rows: together the same rows"
    _close(got["loss_history"], ref["loss_history"], range(1, STEPS + 1), "FSDP2 on 2")
    _check_sharding(got, ck)
    fsdp_ckpt = tmp_path / "two" / "out" / "checkpoint-2"
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= {p.name for p in fsdp_ckpt.iterdir()}

    # FSDP2 (2 processes) -> 1 process
    out = tmp_path / "fsdp_on_one" / "out"
    out.mkdir(parents=True)
    shutil.copytree(fsdp_ckpt, out / "checkpoint-2")
    cfg = load_config(two, [f"output={out}"])
    res = train(cfg, resume=True, progress=False).summary
    assert cfg.training.grad_accum == 2 and res["resumed_from"].endswith("checkpoint-2")
    _close(res["loss_history"], ref["loss_history"], (3, 4), "FSDP2 checkpoint resumed on 1")

    # 1 process -> FSDP2 (2 processes)
    out = tmp_path / "one_on_fsdp" / "out"
    out.mkdir(parents=True)
    shutil.copytree(tmp_path / "one" / "out" / "checkpoint-2", out / "checkpoint-2")
    _fsdp(two, f"output={out}", resume=True)
    res = json.loads((out / "summary.json").read_text())
    assert res["strategy"] == "fsdp" and res["resumed_from"].endswith("checkpoint-2")
    _close(res["loss_history"], ref["loss_history"], (3, 4), "1-process checkpoint resumed under FSDP2")


def _check_sharding(summary, checkpoint):
    """Each process holds half the parameter bytes; the decoder layers in units (the tiny model's
    few small layers: one unit under fsdp_layers_per_unit auto), the frozen vision tower one unit, so
    are the (tied) embeddings and lm_head; the root unit (whole through forward and backward) keeps only the
    final norm (vlm.train.fsdp_units)."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    layers = cfg["text_config"]["num_hidden_layers"]
    whole = summary["sharding"]["parameter_bytes_whole"]
    assert summary["parameter_bytes_per_process"] == [whole // 2, whole // 2]
    sizes = summary["sharding"]["layout"]["decoder_unit_layers"]
    assert sum(sizes) == layers and summary["sharding"]["fsdp_units"] == len(sizes) + 3   # + tower, tied embeddings/lm_head, root
    root = summary["sharding"]["root_unit_modules"]
    kept = (".language_model.norm",)
    assert root and all(any(k in m for k in kept) for m in root), root


def test_cross_strategy_resume_names_what_it_cannot_read(tmp_path):
    from vlm.train.cross_resume import check_readable, crosses

    plain = tmp_path / "checkpoint-2"
    plain.mkdir()
    (plain / "adapter_model.safetensors").write_bytes(b"")
    assert crosses(plain, fsdp_now=True) and not crosses(plain, fsdp_now=False)
    with pytest.raises(VlmError, match="optimizer.pt missing"):
        check_readable(plain)
    full = tmp_path / "checkpoint-4"
    (full / "optimizer_0").mkdir(parents=True)
    (full / "pytorch_model_fsdp.bin").write_bytes(b"")
    assert crosses(full, fsdp_now=False)
    with pytest.raises(VlmError, match="fsdp_state_dict: full"):
        check_readable(full)
