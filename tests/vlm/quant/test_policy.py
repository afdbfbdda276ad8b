"""QuantPolicy parsing and validation: presets, dict/YAML forms, and clear errors for bad input."""

import pytest

from vlm.errors import ConfigError
from vlm.quant.metrics import layer_bytes
from vlm.quant.policy import NF4Multiple, QuantPolicy, parse_budget


def test_presets():
    nf4 = QuantPolicy.parse("nf4")
    assert nf4.components["vision"] == "nf4" and nf4.components["projector"] == "nf4"
    assert nf4.components["lm_head"] == "bf16" and not nf4.sensitivity and nf4.double_quant
    dyn = QuantPolicy.parse("dynamic")
    # the default: every vision/projector/language linear a measured candidate, protected in int8w
    # or 16-bit while the whole model stays within 1.08 × its nf4-preset bytes
    assert dyn.components == nf4.components
    assert dyn.sensitivity and dyn.budget == NF4Multiple(1.08) and dyn.double_quant
    assert dyn.tiers == ("int8w", "bf16")
    assert QuantPolicy.parse("bf16").quant_kind is None


def test_dict_and_yaml_round_trip(tmp_path):
    pol = QuantPolicy.parse({"preset": "dynamic", "budget": "300MB", "vision": "fp4",
                             "language": "fp4", "overrides": {"*.down_proj": "bf16"}})
    assert pol.budget == 300_000_000 and pol.quant_kind == "fp4"
    assert pol.components["projector"] == "fp4"     # the preset's other candidate follows the type
    assert pol.overrides == (("*.down_proj", "bf16"),)
    assert QuantPolicy.parse(pol.to_dict()) == pol.replace(name=pol.name)
    f = tmp_path / "p.yaml"
    f.write_text("quant:\n  preset: nf4\n  double_quant: false\n  overrides:\n    - {glob: 'lm_head', precision: bf16}\n")
    p2 = QuantPolicy.parse(str(f))
    assert p2.double_quant is False and p2.components["vision"] == "nf4"


@pytest.mark.parametrize("spec, words", [
    ({"vison": "nf4"}, ["vison", "vision"]),                       # unknown key / component
    ({"components": {"decoder": "nf4"}}, ["decoder", "components"]),
    ({"vision": "nf3"}, ["nf3", "nf4"]),                           # unknown precision
    ({"overrides": {"*.q_proj": "int4"}}, ["int4"]),
    ({"budget": 1.5}, ["1.5", "[0, 1]"]),                          # budget out of range
    ({"budget": -3}, ["-3"]),
    ({"budget": "lots"}, ["lots"]),
    ({"budget": "0.9x"}, ["0.9", "NF4 bytes"]),                    # below the NF4 model itself
    ({"vision": "nf4", "language": "int8"}, ["int8", "nf4"]),      # two storage types
    ({"embeddings": "nf4"}, ["embeddings"]),
])
def test_bad_input_names_the_problem(spec, words):
    with pytest.raises(ConfigError) as e:
        QuantPolicy.parse(spec)
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="dynamc.*dynamic"):
        QuantPolicy.parse("dynamc")
    with pytest.raises(ConfigError, match="does not exist"):
        QuantPolicy.parse("/nowhere/policy.yaml")


def test_budget_forms():
    assert parse_budget(0.25) == 0.25 and parse_budget("0.25") == 0.25
    assert parse_budget("1.5GiB") == int(1.5 * 2**30) and parse_budget(1000) == 1000
    assert parse_budget("1.08x") == parse_budget(" 1.08 x nf4 ") == NF4Multiple(1.08)


def test_existing_budgets_keep_their_meaning_and_the_new_one_round_trips():
    """A config that wrote a budget keeps it (fraction / bytes); one that did not gets the
    preset's; the NF4 multiple survives to_dict → parse (checkpoints, the plan cache)."""
    for budget in (0.1, 0.05, 300_000_000):
        pol = QuantPolicy.parse({"preset": "dynamic", "budget": budget})
        assert pol.budget == budget and type(pol.budget) is type(budget)
        assert QuantPolicy.parse(pol.to_dict()) == pol
    dyn = QuantPolicy.parse({"preset": "dynamic"})
    assert dyn.to_dict()["budget"] == "1.08x" and QuantPolicy.parse(dyn.to_dict()) == dyn
    assert QuantPolicy.parse("dynamic", budget="1.2x").budget == NF4Multiple(1.2)
    assert QuantPolicy.parse({"preset": "dynamic", "tiers": ["bf16"]}).tiers == ("bf16",)


def test_layer_bytes():
    # 4096x4096 NF4 + double quant: 8 MiB codes + 262144 uint8 absmax + 1024 fp32 + 4
    assert layer_bytes(4096, 4096, "nf4", True) == 8 * 2**20 + 262144 + 4096 + 4
    assert layer_bytes(4096, 4096, "nf4", False) == 8 * 2**20 + 4 * 262144
    assert layer_bytes(10, 20, "bf16", bias=True) == 400 + 20
