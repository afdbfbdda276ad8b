"""`vlm train` with `training.compile: true`: the same loss curve as eager, and `--resume` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..._concurrent import Run
from ._tiny_run import write_config


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop("TRITON_INTERPRET", None)
    return env


def _train(cfg, *extra):
    r = subprocess.run([sys.executable, "-m", "vlm", "train", str(cfg), *extra], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def _train_together(*cfgs) -> list[str]:
    """`vlm train` of each (independent) config, all started at once (tests/_concurrent.py): stdouts."""
    runs = [Run([sys.executable, "-m", "vlm", "train", cfg], cfg.parent / "logs", env=_env()) for cfg in cfgs]
    try:
        done = [run.wait(timeout=600) for run in runs]
    finally:
        for run in runs:
            run.stop()
    for r in done:
        assert r.returncode == 0, r.args[-1] + "\n" + r.stdout[-2000:] + r.stderr[-3000:]
    return [r.stdout for r in done]


def test_compiled_training_matches_eager_and_resumes(tmp_path, tiny_checkpoint):
    from vlm.data_formats.synthetic import generate

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=16, seed=7)
    common = {"training.gradient_checkpointing": True, "training.schedule": "constant"}

    (tmp_path / "eager").mkdir()
    eager = write_config(tmp_path / "eager", ck, data.sharegpt_json, max_steps=4, save_steps=2,
                         extra={**common, "training.compile": False})
    (tmp_path / "compiled").mkdir()
    first = write_config(tmp_path / "compiled", ck, data.sharegpt_json, max_steps=2, save_steps=2,
                         extra={**common, "training.compile": True})
    _, log = _train_together(eager, first)   # the eager reference and the compiled run side by side
    ref = json.loads((tmp_path / "eager" / "out" / "summary.json").read_text())
    assert ref["compiled_layers"] is False
    assert "torch.compile: 2 language decoder layers" in log
    assert "compile caches: inductor " in log and "(FX graph + AOTAutograd)" in log
    cold = json.loads((tmp_path / "compiled" / "out" / "summary.json").read_text())["startup_seconds"]
    # continue the compiled run from its checkpoint to step 4 (the override raises max_steps only)
    _train(first, "training.max_steps=4", "--resume")
    got = json.loads((tmp_path / "compiled" / "out" / "summary.json").read_text())
    # startup opened up (vlm.train.startup_clock): the first step's compile by phase, imports by package
    warm = got["startup_seconds"]
    for startup in (cold, warm):
        split = startup["first_step_compile"]
        assert split["frames"] >= 2 and split["graphs"] >= 2   # a decoder layer and a vision block at least
        assert 0 < startup["first_step_compile_s"] <= startup["first_step_s"]
        assert startup["first_step_setup_s"] + startup["first_step_compile_s"] + startup["first_step_run_s"] \
            == pytest.approx(startup["first_step_s"], abs=0.03)
        assert 0 <= startup["first_step_data_wait_s"] <= startup["first_step_run_s"] + 0.02
        assert split["dynamo_trace_s"] > 0 and split["backend_s"] > 0
        imports = startup["imports_split"]
        assert imports["python_start"] >= 0 and imports["torch._C"] > 0 and sum(imports.values()) <= startup["imports_s"] + 0.05
        # the LoRA + fast path phase by step: the steps add up to the phase, CPU time beside them
        steps = startup["lora_and_fast_path_split"]
        assert {"lora_s", "vision_attention_s", "compile_setup_s", "packing_s"} <= set(steps)
        assert sum(v for k, v in steps.items() if k.endswith("_s") and k not in ("cpu_s", "wall_s")) \
            == pytest.approx(steps["wall_s"], abs=0.01)
        assert steps["wall_s"] == pytest.approx(startup["lora_and_fast_path_s"], abs=0.02) and steps["cpu_s"] > 0
        assert steps["imports_in_phase"]["s"] >= 0 and steps["compile_workers_ready_at_start"] is None   # no pool on CPU
        # each frame dynamo traced, by code: the decoder layer (checkpoint inside) and the vision block
        frames = split["frames_traced"]
        assert len(frames) == split["frames"]
        assert {f["code"].split()[0] for f in frames} == {"_checkpointed_call", "forward"}
        assert all(f["dynamo_s"] > 0 and f["failed"] is None for f in frames)
        assert not any(f["recompile"] for f in frames)   # token dims marked dynamic up front: no recompile
    # the second process loads every graph the first compiled from inductor's caches (none recompiled)
    assert cold["first_step_compile"]["fx_graph_cache"]["bypass"] == 0
    assert warm["first_step_compile"]["fx_graph_cache"]["miss"] == 0 and warm["first_step_compile"]["fx_graph_cache"]["hit"] >= 2
    assert warm["first_step_compile"]["aot_autograd_cache"]["miss"] == 0
    assert got["compiled_layers"] is True and got["resumed_from"].endswith("checkpoint-2")
    assert got["compiled_vision_blocks"] > 0   # the frozen, batched Qwen2-VL tower compiles too
    # the resumed process compiles its graphs again in its first step: the steady window starts after it
    assert got["compile_steps"][0] == 3 and got["steady_after_step"] >= max(got["compile_steps"])
    assert ref["compile_steps"] == [] and ref["steady_after_step"] == 2
    assert [s for s, _ in got["loss_history"]] == [s for s, _ in ref["loss_history"]] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(got["loss_history"], ref["loss_history"]):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: compiled {a} vs eager {b}"
    adapter = tmp_path / "compiled" / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()


def test_cuda_graphs_setting_pads_every_batch_to_max_length(tmp_path, tiny_checkpoint):
    """training.cuda_graphs: compiled layers in reduce-overhead mode and every batch padded to
    data.max_length (one recorded shape). On CPU torch runs the compiled graphs without CUDA graphs,
    so this checks the plumbing and that padding to max_length leaves the loss curve unchanged."""
    from vlm.data_formats.synthetic import generate

    ck = tiny_checkpoint("qwen2_vl")
    data = generate(tmp_path / "data", n=8, seed=3)
    common = {"training.gradient_checkpointing": True, "training.schedule": "constant", "data.max_length": 96}
    cfgs = {}
    for name, extra in (("eager", {"training.compile": "auto", "training.cuda_graphs": True}),   # CPU: off
                        ("graphs", {"training.compile": True, "training.cuda_graphs": True, "training.mlp_chunks": 2})):
        (tmp_path / name).mkdir()
        cfgs[name] = write_config(tmp_path / name, ck, data.sharegpt_json, max_steps=2, save_steps=2,
                                  extra={**common, **extra})
    runs = {name: (log, json.loads((tmp_path / name / "out" / "summary.json").read_text()))
            for name, log in zip(cfgs, _train_together(*cfgs.values()))}
    log, eager = runs["eager"]
    assert "training.cuda_graphs replays compiled layers and compile is off" in log
    assert eager["cuda_graphs"] is False and eager["padded_to"] == 8 and eager["mlp_chunks"] == 1
    log, graphs = runs["graphs"]
    assert "CUDA graphs, every batch padded to 96 tokens" in log and "MLP over 2 token blocks" in log
    assert "training.cuda_graphs: samples average" in log and "of 96 tokens" in log
    assert graphs["cuda_graphs"] is True and graphs["padded_to"] == 96 and graphs["mlp_chunks"] == 2
    # every micro-batch begins with torch's CUDA-graph step mark (torch's own counter; vlm.train.graph_steps)
    assert graphs["cuda_graph_step_marks"] == graphs["steps"] == 2 and eager["cuda_graph_step_marks"] == 0
    assert graphs["cuda_graphs_fallback"] is None
    for (step, a), (_, b) in zip(graphs["loss_history"], eager["loss_history"]):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: padded+compiled {a} vs eager {b}"
