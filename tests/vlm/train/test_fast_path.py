"""vlm.train.fast_path: the speed settings resolved from the config (the compiled runs themselves
are tested in test_compile.py and test_compile_train.py)."""

from __future__ import annotations

import pytest

import vlm
from vlm.errors import ConfigError
from vlm.train.fast_path import compile_memory_warning, compile_wanted, padding_note


def test_compile_setting_resolution():
    assert compile_wanted("auto", "cuda", "single") is True
    assert compile_wanted("auto", "cuda:1", "ddp") is True
    assert compile_wanted("auto", "cpu", "single") is False
    # FSDP2: compiled where measured faster on GPUs (16-bit LoRA), eager where not measured
    assert compile_wanted("auto", "cuda", "fsdp") is True
    assert compile_wanted("auto", "cuda", "fsdp", quantized=True) is False
    assert compile_wanted("auto", "cuda", "fsdp", method="full") is False
    assert compile_wanted("auto", "cuda", "ddp", quantized=True, method="full") is True
    assert compile_wanted("auto", "cpu", "fsdp") is False
    assert compile_wanted(False, "cuda", "single") is False
    assert compile_wanted(True, "cpu", "single") is True
    assert compile_wanted(True, "cuda", "fsdp") is True     # FSDP2 + compile: test_compile_fsdp.py


def test_compile_without_kernels_on_4bit_warns(tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    q4, _ = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="bf16", device="cpu", quant="nf4")
    assert "vlm::nf4_linear" in compile_memory_warning(q4, kernels=False)
    assert compile_memory_warning(q4, kernels=True) is None
    assert compile_memory_warning(vlm.load(tiny_checkpoint("qwen2_vl"), dtype="fp32", device="cpu")[0],
                                  kernels=False) is None   # 16-bit: nothing to keep


def test_padding_note_says_what_cuda_graph_padding_costs():
    assert padding_note([10, 30], 40) == ("training.cuda_graphs: samples average 20 of 40 tokens, so 50% of "
                                          "the tokens computed are padding")
    note = padding_note([10], 40)
    assert note.startswith("warning: ") and "75% of the tokens computed are padding" in note
    assert "data.max_length" in note


def test_quantized_policy_detection_for_the_compile_rule():
    from vlm.train.fast_path import _quantized

    assert _quantized("dynamic") and _quantized("nf4")
    assert not _quantized(None) and not _quantized("bf16")
