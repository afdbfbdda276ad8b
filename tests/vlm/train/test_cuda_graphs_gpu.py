"""`vlm train` with `training.cuda_graphs: true` on a GPU (run on the device: `pytest -m gpu`).

The CPU tests check the plumbing (torch runs compiled graphs without CUDA graphs there); this one
replays real CUDA graphs through HF's Trainer, with and without MLP token blocks, 16-bit and QLoRA,
and compares the loss curve with the eager run of the same config."""

from __future__ import annotations

import json

import pytest
import torch

from ._tiny_run import write_config
from .test_compile_train import _train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("quant", [None, "nf4"], ids=["lora", "qlora"])
def test_cuda_graph_training_follows_the_eager_loss_curve(tmp_path, tiny_checkpoint, quant):
    from vlm.data_formats.synthetic import generate

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=24, seed=5)
    common = {"model.device": "cuda", "kernels": True, "training.gradient_checkpointing": True,
              "training.schedule": "constant", "data.max_length": 128}
    runs = {}
    for name, extra in (("eager", {"training.compile": False}),
                        ("graphs", {"training.compile": True, "training.cuda_graphs": True}),
                        ("graphs_mlp2", {"training.compile": True, "training.cuda_graphs": True,
                                         "training.mlp_chunks": 2})):
        (tmp_path / name).mkdir()
        cfg = write_config(tmp_path / name, ck, data.sharegpt_json, max_steps=6, save_steps=6, quant=quant,
                           extra={**common, **extra})
        log = _train(cfg)
        runs[name] = (log, json.loads((tmp_path / name / "out" / "summary.json").read_text()))
    eager = runs["eager"][1]["loss_history"]
    for name in ("graphs", "graphs_mlp2"):
        log, s = runs[name]
        assert "CUDA graphs, every batch padded to 128 tokens" in log
        assert s["cuda_graphs"] is True and s["padded_to"] == 128 and s["steps"] == 6
        # replayed all the way: the fallback to graphs-free layers (vlm.train.graph_steps) did not fire
        assert s["cuda_graphs_fallback"] is None, s["cuda_graphs_fallback"]
        assert s["cuda_graph_step_marks"] == 6
        # fp32 weights; QLoRA's eager path runs the fused NF4+LoRA kernel, the compiled one the op
        for (step, a), (_, b) in zip(s["loss_history"], eager):
            assert a == pytest.approx(b, rel=1e-3 if quant is None else 1e-2), f"{name} step {step}"
