"""Plans against real models: per-family 4-bit counts, exact skip names, bad globs, tied lm_head."""

import pytest
import torch
from torch import nn

from vlm.errors import ConfigError
from vlm.families.base import Family
from vlm.quant.plan import resolve_plan
from vlm.quant.policy import QuantPolicy

from vlm.zoo import VARIANTS

FAMILY_VARIANTS = tuple(VARIANTS)


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_four_bit_counts_per_component_match_policy(tiny_checkpoint, variant):
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText

    from vlm.load import load

    path = tiny_checkpoint(variant)
    ref = AutoModelForImageTextToText.from_pretrained(path)
    family_layers = None
    model, _ = load(path, device="cpu", dtype="bf16", quant={
        "preset": "nf4", "projector": "bf16",
        # keep decoder layer 0 whole in 16-bit: its siblings in layer 1 (and 10, 11...) must stay 4-bit
        "overrides": {"model.language_model.layers.0": "bf16"}})
    family = model.vlm_family
    family_layers = family.language_layers + ".0."
    want: dict[str, int] = {}
    for name, mod in ref.named_modules():
        if type(mod) is not nn.Linear:
            continue
        comp = family.component_of(name)
        if comp in ("vision", "language") and not name.startswith(family_layers):
            want[comp] = want.get(comp, 0) + 1
    got: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            assert mod.weight.quant_type == "nf4", name
            comp = family.component_of(name)
            got[comp] = got.get(comp, 0) + 1
    assert want.get("vision", 0) > 0 and want.get("language", 0) > 0
    assert got == want
    assert model.vlm_quant_plan.count_by_component("nf4") == want
    assert model.config.vlmtune["quant"]["counts"]["quantized"] == want


class _Toy(nn.Module):
    """11 linears in a Sequential: "body.1" is a string prefix of "body.10"."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(11)])


_TOY_FAMILY = Family(name="toy", description="", model_types=("toy",),
                     component_prefixes={"language": ("body",)}, language_layers="body")


def test_skip_names_never_catch_a_sibling():
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = _Toy()
    pol = QuantPolicy.parse({"language": "nf4", "overrides": {"body.1": "bf16"}})
    plan = resolve_plan(pol, model, _TOY_FAMILY)
    assert plan.kept() == ["body.1"] and "body.10" in plan.quantized()
    skip = plan.skip_modules()
    converted = {n for n, m in model.named_modules()
                 if type(m) is nn.Linear and should_convert_module(n, skip)}
    assert converted == set(plan.quantized())
    # the plain name would also have skipped body.10 (transformers matches keys as prefixes)
    assert not should_convert_module("body.10", ["body.1"])


def test_glob_matching_nothing_is_an_error():
    pol = QuantPolicy.parse({"language": "nf4", "overrides": {"body.*.fc9": "bf16"}})
    with pytest.raises(ConfigError, match=r"body\.\*\.fc9.*matches no linear layer"):
        resolve_plan(pol, _Toy(), _TOY_FAMILY)


def test_tied_lm_head_cannot_be_quantized(tiny_checkpoint):
    from vlm.families import family_for_config
    from vlm.load import load_config
    from vlm.quant.loading import meta_model

    config = load_config(tiny_checkpoint("qwen2_vl"))   # tie_word_embeddings=True
    pol = QuantPolicy.parse({"preset": "nf4", "lm_head": "nf4"})
    with pytest.raises(ConfigError, match="lm_head.*tie_word_embeddings"):
        resolve_plan(pol, meta_model(config, torch.bfloat16), family_for_config(config))
