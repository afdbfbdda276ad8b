"""`training.compile: true` under FSDP2 (2 gloo processes on CPU): compiled decoder layers that are
also FSDP units train to the eager 1-process losses.

Under FSDP2 each decoder layer is an FSDP unit whose pre/post-forward hooks all-gather and free
its weights; ``nn.Module.compile`` compiles the layer's call, and dynamo runs FSDP's hooks outside
the graph (``torch._dynamo.config.skip_fsdp_hooks``). ``dynamo_graphs`` > 0 shows compiled code ran.
Tolerance: test_compile_train's (rel 1e-4): compiled vs eager differ only in float operation order.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ._tiny_run import write_config
from .test_distributed import _env


@pytest.mark.slow
def test_compiled_layers_under_fsdp2_match_eager_one_process(tmp_path, tiny_checkpoint):
    from vlm.data_formats.synthetic import generate
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=16, seed=7)
    common = {"training.gradient_checkpointing": True, "training.compile": False}
    (tmp_path / "eager").mkdir()
    eager = write_config(tmp_path / "eager", ck, data.sharegpt_json, max_steps=4, save_steps=10,
                         batch_size=4, extra=common)
    ref = train(load_config(eager), progress=False).summary

    (tmp_path / "fsdp").mkdir()
    two = write_config(tmp_path / "fsdp", ck, data.sharegpt_json, max_steps=4, save_steps=10,
                       batch_size=2, extra={**common, "training.compile": True})
    r = subprocess.run([sys.executable, "-m", "vlm", "train", str(two), "distributed.strategy=fsdp",
                        "--nproc", "2"], env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "torch.compile: 2 language decoder layers" in r.stdout
    got = json.loads((tmp_path / "fsdp" / "out" / "summary.json").read_text())
    assert got["strategy"] == "fsdp" and got["compiled_layers"] is True and got["dynamo_graphs"] > 0
    assert got["tokens"] == ref["tokens"]
    for (step, a), (_, b) in zip(got["loss_history"], ref["loss_history"], strict=True):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: compiled FSDP2 {a} vs eager 1 process {b}"


def test_cuda_graphs_under_fsdp_is_refused():
    from vlm.errors import ConfigError
    from vlm.train.config import parse_config
    from vlm.train.fast_path import resolve

    cfg = parse_config({"model": "m", "data": {"train": ["t.jsonl"]}},
                       ["training.compile=true", "training.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="cuda_graphs: not with distributed.strategy fsdp"):
        resolve(cfg, "cuda", "fsdp")
    assert resolve(cfg, "cuda", "ddp").cuda_graphs
