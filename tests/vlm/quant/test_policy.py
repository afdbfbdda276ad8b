"""QuantPolicy parsing and validation: presets, dict/YAML forms, and clear errors for bad input."""

import pytest

from vlm.errors import ConfigError
from vlm.quant.metrics import layer_bytes
from vlm.quant.policy import QuantPolicy, parse_budget


def test_presets():
    nf4 = QuantPolicy.parse("nf4")
    assert nf4.components["vision"] == "nf4" and nf4.components["projector"] == "nf4"
    assert nf4.components["lm_head"] == "bf16" and not nf4.sensitivity and nf4.double_quant
    dyn = QuantPolicy.parse("dynamic")
    assert dyn.components["projector"] == "bf16" and dyn.components["language"] == "nf4"
    assert dyn.sensitivity and dyn.budget == 0.10 and dyn.double_quant
    assert QuantPolicy.parse("bf16").quant_kind is None


def test_dict_and_yaml_round_trip(tmp_path):
    pol = QuantPolicy.parse({"preset": "dynamic", "budget": "300MB", "vision": "fp4",
                             "language": "fp4", "overrides": {"*.down_proj": "bf16"}})
    assert pol.budget == 300_000_000 and pol.quant_kind == "fp4"
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


def test_layer_bytes():
    # 4096x4096 NF4 + double quant: 8 MiB codes + 262144 uint8 absmax + 1024 fp32 + 4
    assert layer_bytes(4096, 4096, "nf4", True) == 8 * 2**20 + 262144 + 4096 + 4
    assert layer_bytes(4096, 4096, "nf4", False) == 8 * 2**20 + 4 * 262144
    assert layer_bytes(10, 20, "bf16", bias=True) == 400 + 20
