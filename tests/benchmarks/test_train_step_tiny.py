"""benchmarks/train_step.py end to end on CPU (--tiny): every setup runs in its own process and the
vlmtune setups compute the HF baseline's first-step loss."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from train_step_workload import MODELS, model_config  # noqa: E402

from .._concurrent import Run  # noqa: E402

ALL_SETUPS = "default model, every setup"


def _benchmark_args(run: str) -> list[str]:
    if run == ALL_SETUPS:
        return ["--variants", "a,d,d_eager,e"]
    return ["--model", run, "--variants", "a,d"]


@pytest.fixture(scope="module")
def step_runs(request, tmp_path_factory):
    """The benchmark runs of this module's selected tests, all started at once (tests/_concurrent.py):
    each test waits for its own run; on 2 cores the shorter runs finish beside the longest one."""
    wanted = []
    for item in request.session.items:
        if item.module is request.module:
            callspec = getattr(item, "callspec", None)
            wanted.append(callspec.params["model"] if callspec else ALL_SETUPS)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)   # CPU without the interpreter: vlm.kernels.patch steps aside
    runs = {}
    for run in dict.fromkeys(wanted):
        out = tmp_path_factory.mktemp("train_step")
        argv = [sys.executable, REPO / "benchmarks" / "train_step.py", "--tiny", "--device", "cpu",
                *_benchmark_args(run), "--steps", "1", "--warmup", "1", "--profile", "", "--out", out]
        runs[run] = (Run(argv, out / "logs", env=env), out)
    yield runs
    for run, _ in runs.values():
        run.stop()


def _finished(step_runs, run: str) -> Path:
    proc, out = step_runs[run]
    r = proc.wait(timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def test_tiny_run_all_setups_agree_on_the_loss(step_runs):
    tmp_path = _finished(step_runs, ALL_SETUPS)
    data = json.loads((tmp_path / "train_step_tiny.json").read_text())
    rows = {row["variant"]: row for row in data["rows"]}
    assert set(rows) == {"a", "d", "d_eager", "e"} and not [v for v, row in rows.items() if "error" in row]
    a = rows["a"]["first_step_loss"]
    for v in ("d", "d_eager"):
        assert rows[v]["first_step_loss"] == pytest.approx(a, rel=1e-4), v
    assert rows["e"]["first_step_loss"] == pytest.approx(a, rel=1e-2)   # 4-bit weights: close, not equal
    assert rows["d"]["compiled_layers"] == 2 and rows["d"]["vision_attention_batched"] == 2
    assert rows["d"]["compiled_vision_blocks"] == 2   # the frozen, batched tower compiles as in vlm train
    assert "compiled_layers" not in rows["d_eager"]
    assert (tmp_path / "train_step_tiny.md").read_text().startswith("# Training step on W")


def _one_model_per_architecture() -> list[str]:
    """The step benchmark's models (train_step_workload.MODELS), one per transformers architecture
    other than the default model's (tested above): sizes of one architecture share one tiny model."""
    # Qwen2.5-VL's and LLaVA's compiled, batched towers are tested over the zoo by
    # tests/vlm/train/test_compile.py and tests/vlm/test_vision_attention.py (LLaVA's W also ran on the
    # GPU); CI's 30-minute budget keeps this ~35 s subprocess run to the other architectures
    on_gpu = {"qwen2_5_vl", "llava"}
    seen = {model_config(MODELS[0], tiny=True).model_type} | on_gpu
    picked = []
    for m in MODELS[1:]:
        kind = model_config(m, tiny=True).model_type
        if kind not in seen:
            seen.add(kind)
            picked.append(m)
    return picked


@pytest.mark.parametrize("model", _one_model_per_architecture())
def test_tiny_every_architecture_batched_compiled_same_loss(step_runs, model):
    """W at each benchmarked architecture's shapes (tiny): the vlmtune setup (vision attention batched
    where the family's tower allows it, decoder layers and frozen vision blocks compiled) has the HF
    baseline's first-step loss: Qwen2.5-VL's windows, Qwen3-VL's DeepStack and interleaved M-RoPE,
    LLaVA's CLIP tower."""
    from vlm.families import family_for_config

    tmp_path = _finished(step_runs, model)
    data = json.loads((tmp_path / f"train_step_{model}_tiny.json").read_text())
    rows = {row["variant"]: row for row in data["rows"]}
    assert not [v for v, row in rows.items() if "error" in row], rows
    assert rows["d"]["first_step_loss"] == pytest.approx(rows["a"]["first_step_loss"], rel=1e-4)
    depth = data["config"]["vision_config"].get("depth") or data["config"]["vision_config"]["num_hidden_layers"]
    family = family_for_config(model_config(model, tiny=True))
    batched = depth if family.batched_vision_attention else 0
    assert rows["d"]["vision_attention_batched"] == batched and rows["d"]["compiled_vision_blocks"] == depth
    assert rows["d"]["compiled_layers"] == data["config"]["text_config"]["num_hidden_layers"]
