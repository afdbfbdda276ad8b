"""A short `vlm demo`: QLoRA on the shipped self-trained base must beat the base on held-out images
of a task it does not know (the full demo runs the same code with more data and steps)."""

import json

import pytest


@pytest.mark.slow
def test_short_demo_beats_the_base(tmp_path):
    from vlm.demo.run import run_demo

    # kernels=false: the test session sets TRITON_INTERPRET=1 (for the kernel tests), under which
    # patch() would run every Triton kernel in the interpreter; `vlm demo` on a CPU skips them anyway.
    # 100 steps: after 60, exact match was 0/24 or 1/24 depending on the CPU's floating-point kernels
    # (0/24 on an AVX512-BF16 EPYC); after 100 it was 4/24 there.
    res = run_demo(tmp_path / "demo", n_train=128, n_heldout=24,
                   overrides=["training.max_steps=100", "training.logging_steps=10", "training.save_steps=100",
                              "kernels=false"])
    before, after = res["before"], res["after"]
    assert before["exact_match"] == 0.0, "the base must not already know the task"
    mean = lambda s: sum(s["per_attribute"].values()) / len(s["per_attribute"])  # noqa: E731
    assert mean(after) > mean(before) + 0.25, (before, after)
    assert after["exact_match"] > before["exact_match"]
    out = tmp_path / "demo"
    saved = json.loads((out / "demo_results.json").read_text())
    assert saved["after"]["exact_match"] == after["exact_match"]
    for name in ("train/adapter/adapter_config.json", "train/adapter/vlmtune.json", "train/summary.json",
                 "train/loss_curve.png", "accuracy.png"):
        assert (out / name).is_file(), name
    assert res["quant_counts"], "the base was loaded under the dynamic 4-bit policy"
