"""The dynamic plan cache: a second load of the same checkpoint, calibration and policy skips the
analysis and yields the same plan and the same model; anything that changes the analysis' inputs
(weights re-saved, the policy, the switch) runs it again."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import vlm
from vlm.quant import loading


@pytest.fixture
def cached(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_QUANT_PLAN_CACHE", "1")
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = loading.analyse

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "analyse", counting)
    return calls, tmp_path / "cache" / "quant_plans"


def _logits(model, processor):
    from PIL import Image

    from vlm.quant.calibration import render

    batch = render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
                   [Image.new("RGB", (64, 48), (20, 120, 200))])
    with torch.no_grad():
        return model(**batch).logits


def test_second_load_uses_the_cache_and_gives_the_same_model(cached, tiny_checkpoint, tmp_path, capsys):
    calls, root = cached
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), ckpt)
    first, processor = vlm.load(str(ckpt), device="cpu", dtype="bf16", quant="dynamic")
    assert len(calls) == 1 and len(list(root.glob("*.json"))) == 1
    said = capsys.readouterr().out        # the log says where the analysis time went
    assert "(metric propagated) analysis " in said and "propagated sensitivity" in said
    assert "groups ×" in said and "capture" in said and "layer errors" in said
    second, _ = vlm.load(str(ckpt), device="cpu", dtype="bf16", quant="dynamic")
    assert len(calls) == 1                                   # no analysis the second time
    assert "plan from the analysis cache" in capsys.readouterr().out
    meta1, meta2 = (m.config.vlmtune["quant"] for m in (first, second))
    assert meta1 == meta2                                    # protected layers, counts, analysis record
    assert torch.equal(_logits(first, processor), _logits(second, processor))

    # another policy: another key
    vlm.load(str(ckpt), device="cpu", dtype="bf16", quant={"preset": "dynamic", "budget": 0.05})
    assert len(calls) == 2
    # the KL metric: its own entry, and the default's entry is still there
    vlm.load(str(ckpt), device="cpu", dtype="bf16", quant={"preset": "dynamic", "metric": "output"})
    assert len(calls) == 3 and len(list(root.glob("*.json"))) == 3
    vlm.load(str(ckpt), device="cpu", dtype="bf16", quant="dynamic")
    assert len(calls) == 3
    # the weights saved again (new mtime): analysed again
    weights = next(ckpt.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    vlm.load(str(ckpt), device="cpu", dtype="bf16", quant="dynamic")
    assert len(calls) == 4


def test_a_corrupt_entry_is_analysed_again_and_the_switch_turns_it_off(cached, tiny_checkpoint, monkeypatch):
    calls, root = cached
    ckpt = tiny_checkpoint("qwen2_vl")
    vlm.load(str(ckpt), device="cpu", dtype="bf16", quant="dynamic")
    entry = next(root.glob("*.json"))
    assert json.loads(entry.read_text())["protected"] is not None
    entry.write_text("{not json")
    vlm.load(str(ckpt), device="cpu", dtype="bf16", quant="dynamic")
    assert len(calls) == 2 and json.loads(entry.read_text())["protected"] is not None   # rewritten
    monkeypatch.setenv("VLM_QUANT_PLAN_CACHE", "0")
    entry.unlink()
    vlm.load(str(ckpt), device="cpu", dtype="bf16", quant="dynamic")
    assert len(calls) == 3 and not list(root.glob("*.json"))


def test_tiered_plan_cached_with_its_int8w_layers(cached, tiny_checkpoint, tmp_path, capsys):
    from vlm.quant.int8_linear import int8w_layers

    calls, root = cached
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), ckpt)
    tiered = {"preset": "dynamic", "tiers": ["int8w", "bf16"], "budget": 0.3}
    first, processor = vlm.load(str(ckpt), device="cpu", dtype="bf16", quant=tiered)
    int8w = first.vlm_quant_plan.int8w()
    assert int8w and len(calls) == 1
    entry = json.loads(next(root.glob("*.json")).read_text())
    assert entry["protected_int8w"] == sorted(int8w)
    capsys.readouterr()
    second, _ = vlm.load(str(ckpt), device="cpu", dtype="bf16", quant=tiered)
    assert len(calls) == 1 and "int8w" in capsys.readouterr().out
    assert sorted(int8w_layers(second)) == sorted(int8w)
    assert first.config.vlmtune["quant"] == second.config.vlmtune["quant"]
    assert torch.equal(_logits(first, processor), _logits(second, processor))
