"""The kept-layer list at load time: one merged pattern, exactly the plan's layers, cheap to match.

transformers tries every ``llm_int8_skip_modules`` key as a regex against every module name; one
key per kept layer cost 62 s for a Qwen2-VL-7B plan (issue 16). Loading now passes
``plan.skip_pattern()`` (one trie regex) and config.json keeps the explicit names (plain
transformers and vLLM read those).
"""

import random
import re

import pytest
import torch

from vlm.quant.plan import _hf_skip_matches, names_text, skipped_by, trie_regex
from vlm.zoo import VARIANTS

HOSTILE = ["model.layers.1.mlp.fc1", "model.layers.1.mlp.fc10", "model.layers.11.mlp.fc1",
           "model.layers.1", "model_layers_1_mlp_fc1", "x.lm_head", "lm_head", "a.b", "a.bc",
           "a.b.c", "layers.1.mlp.fc1"]


def test_skipped_by_equals_transformers_test_on_hostile_names():
    text = names_text(HOSTILE)
    for key in HOSTILE + ["fc1", "model.layers.1.", "a|lm_head", re.escape("a.b") + "$"]:
        assert skipped_by(key, text) == {n for n in HOSTILE if _hf_skip_matches(key, n)}, key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merged_pattern_skips_exactly_the_kept_layers(tiny_checkpoint, variant):
    """Under transformers' own should_convert_module, with a random half of each zoo family's
    module names kept, plus names that collide as prefixes or through regex dots."""
    from transformers import AutoConfig
    from transformers.quantizers.quantizers_utils import should_convert_module

    from vlm.quant.loading import meta_model

    model = meta_model(AutoConfig.from_pretrained(tiny_checkpoint(variant)))
    names = [n for n, _ in model.named_modules() if n] + HOSTILE
    kept = random.Random(0).sample(names, len(names) // 2)
    key = trie_regex(kept) + "$"
    assert {n for n in names if not should_convert_module(n, [key])} == set(kept)


def test_load_passes_one_pattern_and_saves_the_names(tiny_checkpoint, monkeypatch):
    """A dynamic load costs transformers about one regex call per module (it was 2 × kept
    layers per module), and config.json still names every kept layer for vLLM / plain reload."""
    from transformers.quantizers import quantizers_utils

    from vlm.load import load
    from vlm.quant.loading import bnb_config

    calls = [0]
    real = quantizers_utils.re.match

    def counting(p, s, flags=0):
        calls[0] += 1
        return real(p, s, flags)

    monkeypatch.setattr(quantizers_utils.re, "match", counting)
    model, _ = load(tiny_checkpoint("qwen2_vl"), device="cpu", dtype="bf16",
                    quant={"preset": "dynamic", "budget": 0.3, "calibration_samples": 2})
    monkeypatch.setattr(quantizers_utils.re, "match", real)
    plan = model.vlm_quant_plan
    n_modules = len(list(model.named_modules()))
    assert len(plan.kept()) >= 5
    assert calls[0] <= 3 * n_modules, (calls[0], n_modules, len(plan.kept()))
    saved = model.config.quantization_config.llm_int8_skip_modules
    assert saved == bnb_config(plan, torch.bfloat16).llm_int8_skip_modules
    assert set(plan.skip_modules()) <= set(saved) and not any("(?:" in k for k in saved)
    assert model.config.to_dict()["quantization_config"]["llm_int8_skip_modules"] == saved
