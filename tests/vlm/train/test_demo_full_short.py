"""A short `vlm demo --config configs/demo_full.yaml`: full fine-tuning in bf16 of the shipped base
learns the held-out task, and the saved standard checkpoint is what gets scored."""

import json

import pytest


@pytest.mark.slow
def test_short_full_demo_beats_the_base(tmp_path):
    from vlm.demo.run import REPO_ROOT, run_demo

    res = run_demo(tmp_path / "demo", n_train=128, n_heldout=24, config=REPO_ROOT / "configs" / "demo_full.yaml",
                   overrides=["training.max_steps=60", "training.logging_steps=10", "training.save_steps=60",
                              "kernels=false"])
    before, after = res["before"], res["after"]
    assert res["method"] == "full" and before["exact_match"] == 0.0
    mean = lambda s: sum(s["per_attribute"].values()) / len(s["per_attribute"])  # noqa: E731
    assert mean(after) > mean(before) + 0.25, (before, after)
    assert after["exact_match"] > before["exact_match"]
    out = tmp_path / "demo"
    assert (out / "train" / "model" / "model.safetensors").is_file()
    assert json.loads((out / "train" / "summary.json").read_text())["optimizer"] == "bf16_adamw (stochastic)"
