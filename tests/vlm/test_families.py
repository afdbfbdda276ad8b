"""Family records against the real module trees of the tiny models."""

from __future__ import annotations

import pytest

from vlm.errors import UnsupportedModelError
from vlm.families import COMPONENTS, all_families, family_for_config, get_family
from vlm.zoo import VARIANTS

# the family each zoo variant builds, as the family records declare it (``zoo_variants``)
FAMILY_OF_VARIANT = {v: f.name for f in all_families().values() for v in f.zoo_variants}


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoint):
    """variant -> (model, family), built once for this module (meta weights are not enough: the
    mapping is checked on the real module tree that from_pretrained builds)."""
    from transformers import AutoModelForImageTextToText

    models = {}
    for variant in VARIANTS:
        model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(variant))
        models[variant] = (model, family_for_config(model.config))
    return models


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_found_from_config(tiny_models, variant):
    _, family = tiny_models[variant]
    assert family.name == FAMILY_OF_VARIANT[variant]
    assert variant in family.zoo_variants


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_module_maps_to_a_component(tiny_models, variant):
    model, family = tiny_models[variant]
    containers = {"", "model"}  # hold several components
    unmapped = [n for n, _ in model.named_modules(remove_duplicate=False)
                if n not in containers and family.component_of(n) is None]
    assert unmapped == []
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert [n for n in params if family.component_of(n) is None] == []
    found = family.component_modules(model)
    assert set(found) == set(COMPONENTS)
    for component, names in found.items():
        assert names, f"{variant}: component {component} has no modules"
    for component in ("vision", "projector", "language"):
        assert any(family.component_of(n) == component for n in params), component
    # The projector is its own component even where it lives inside the vision tower (Qwen merger).
    assert family.component_of(found["projector"][0]) == "projector"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_language_layers_and_lora_targets(tiny_models, variant):
    model, family = tiny_models[variant]
    layers = model.get_submodule(family.language_layers)
    assert len(layers) == model.config.get_text_config().num_hidden_layers
    leaf_names = {n.rsplit(".", 1)[-1] for n, _ in layers.named_modules()}
    missing = [t for t in family.lora_language_targets if t not in leaf_names]
    assert missing == []


def test_unsupported_model_type_lists_supported_ones():
    from transformers import BertConfig

    with pytest.raises(UnsupportedModelError) as err:
        family_for_config(BertConfig())
    message = str(err.value)
    assert "'bert'" in message
    for family in all_families().values():
        for model_type in family.model_types:
            assert model_type in message


def test_get_family_by_name():
    # every family has a zoo variant, and every zoo variant a family
    assert set(all_families()) == {FAMILY_OF_VARIANT[v] for v in VARIANTS}
    assert set(FAMILY_OF_VARIANT) == set(VARIANTS)   # every declared zoo variant exists
    assert get_family("pixtral").image_placeholder == "[IMG]"
    with pytest.raises(UnsupportedModelError, match="supported: " + ", ".join(sorted(all_families()))):
        get_family("gpt2")


def test_component_roots_find_the_tower_through_a_peft_wrapper(tiny_checkpoint):
    import vlm
    from vlm.lora import apply_lora

    model, _ = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="fp32", device="cpu")
    fam = model.vlm_family
    roots = fam.component_roots(model, "vision")
    assert [p for p, _ in roots] == ["model.visual"] and roots[0][1] is model.model.visual
    wrapped = apply_lora(model, fam, r=4, warn=False)
    assert [m for _, m in fam.component_roots(wrapped, "vision")] == [model.model.visual]
    assert fam.component_roots(model, "no_such_component") == []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vision_blocks_are_the_towers_blocks(tiny_models, variant):
    """family.vision_blocks names ModuleLists of the vision tower holding all of its blocks."""
    from vlm.train.compile import vision_blocks

    model, family = tiny_models[variant]
    blocks = vision_blocks(model, family)
    vision = model.config.vision_config
    depth = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers")
    depth += getattr(vision, "num_global_layers", 0)   # Mllama: local + global encoder
    assert len(blocks) == depth
    names = {id(m): n for n, m in model.named_modules()}
    assert all(family.component_of(names[id(b)]) == "vision" for b in blocks)
