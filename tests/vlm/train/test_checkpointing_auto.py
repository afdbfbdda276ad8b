"""training.gradient_checkpointing: auto (vlm.train.checkpointing): off for method full where the
device holds the step without it, on everywhere else; true/false as given."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlm.train import checkpointing, modes
from vlm.train.config import parse_config

GB = 10 ** 9


def _cfg(method="full", gc="auto", **training):
    return parse_config({"method": method, "model": {"path": "x", "dtype": "bf16"},
                         "data": {"train": ["d.json"], "max_length": 512},
                         "training": {"gradient_checkpointing": gc, "batch_size": 8, **training}})


def test_activation_estimate_at_qwen2_vl_2b_shapes():
    """6·hidden + 2·kv + 3·intermediate bf16 values per token and layer: 8 × 512 tokens of Qwen2-VL-2B
    (hidden 1536, 2 kv heads of 128, intermediate 8960, 28 layers) keep 8.4 GB."""
    text = SimpleNamespace(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                           intermediate_size=8960, num_hidden_layers=28)
    assert checkpointing.activation_bytes(text, 4096) == 4096 * 28 * (6 * 1536 + 2 * 256 + 3 * 8960) * 2
    assert checkpointing.activation_bytes(text, 4096) == pytest.approx(8.4e9, rel=0.01)


def test_auto_turns_it_off_for_full_only_where_the_device_holds_the_step(tiny_checkpoint):
    import vlm

    model, _ = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="bf16", device="cpu")
    family = model.vlm_family
    cfg = _cfg()
    modes.set_trainable(model, family, modes.trainable_components(family, cfg))
    est = checkpointing.estimate(model, cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() * 2 for p in model.parameters())
    assert est["resident"] == weights + trained * (2 + 4)           # bf16 grads + BF16AdamW's bf16 moments
    need = est["resident"] + checkpointing.ACTIVATION_MARGIN * est["activations"]
    roomy, tight = int(need / checkpointing.DEVICE_SHARE) + 1, int(need / checkpointing.DEVICE_SHARE) - 1
    assert checkpointing.resolve(model, cfg, "cuda:0", "single", device_bytes=roomy).enabled is False
    assert checkpointing.resolve(model, cfg, "cuda:0", "ddp", device_bytes=roomy).enabled is False
    assert checkpointing.resolve(model, cfg, "cuda:0", "single", device_bytes=tight).enabled is True
    # everything else keeps checkpointing, however large the device
    for other in (_cfg("lora"), _cfg("projector"), _cfg(train_vision=True)):
        assert checkpointing.resolve(model, other, "cuda:0", "single", device_bytes=1000 * GB).enabled is True
    assert checkpointing.resolve(model, cfg, "cpu", "single", device_bytes=1000 * GB).enabled is True
    assert checkpointing.resolve(model, cfg, "cuda:0", "fsdp", device_bytes=1000 * GB).enabled is True
    # given values are taken as they are
    assert checkpointing.resolve(model, _cfg(gc=True), "cuda:0", "single", device_bytes=roomy).enabled is True
    assert checkpointing.resolve(model, _cfg(gc=False), "cpu", "single").enabled is False


def test_prepare_applies_the_decision(tiny_checkpoint):
    """modes.prepare checkpoints the decoder layers exactly when the decision says so, and reports it."""
    import vlm

    for gc, expect in (("auto", True), (False, False)):      # auto on CPU: on
        model, _ = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="bf16", device="cpu")
        setup = modes.prepare(model, model.vlm_family, _cfg(gc=gc))
        layers = model.get_submodule(model.vlm_family.language_layers)
        assert setup.checkpointing.enabled is expect
        assert all(layer.gradient_checkpointing is expect for layer in layers)
        assert modes.summary_fields(setup, _cfg(gc=gc))["gradient_checkpointing"] is expect


def test_bad_value_is_refused():
    from vlm.errors import ConfigError

    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        _cfg(gc="sometimes")
