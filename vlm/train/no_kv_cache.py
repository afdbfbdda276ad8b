"""Training builds no KV cache.

A training forward that sees ``use_cache=True`` makes transformers create a ``DynamicCache`` and
append every decoder layer's keys and values to it: memory the step never reads, and, under
``torch.compile`` of each decoder layer (``vlm.train.compile``), one recompile per layer, because
each layer's cache slot starts uninitialised (dynamo guards on ``past_key_values.layers[i]
.is_initialized``). Past the recompile limit (8) the remaining layers run eagerly. Seen at
Qwen2-VL-2B full fine-tuning on an H200: 14 graphs and 170 s of compile on the first step.

Setting ``model.config.use_cache = False`` is not enough with transformers 5's composite
vision-language configs: the language model reads its own ``text_config.use_cache``. Gradient
checkpointing hid this (transformers turns the cache off when it checkpoints), so only runs without
it (``gradient_checkpointing: false`` or ``auto`` on a large GPU) built the cache.

A saved model must keep the checkpoint's own setting (generation reads it): ``use_cache_as_loaded``
puts it back around a save.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

_TURNED_OFF = "_vlm_configs_with_cache_turned_off"   # on the model: the config objects changed


def disable_kv_cache(model: nn.Module) -> list[str]:
    """Set ``use_cache = False`` on every config the model's modules read (each module's config and
    its sub-configs: text, vision, ...). Returns the names of those that had it on."""
    configs: dict[int, tuple[str, object]] = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        owner = name or type(model).__name__
        configs.setdefault(id(config), (f"{owner}.config", config))
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                configs.setdefault(id(sub), (f"{owner}.config.{key}", sub))
    changed = []
    turned_off = getattr(model, _TURNED_OFF, [])
    for label, config in configs.values():
        if getattr(config, "use_cache", False):
            config.use_cache = False
            changed.append(f"{label}.use_cache")
            turned_off.append(config)
    object.__setattr__(model, _TURNED_OFF, turned_off)   # a plain attribute, not a submodule
    return changed


@contextmanager
def use_cache_as_loaded(model: nn.Module):
    """Inside: the configs ``disable_kv_cache`` changed say ``use_cache = True`` again (as the loaded
    checkpoint did), for a save; off again after."""
    configs = getattr(model, _TURNED_OFF, [])
    for config in configs:
        config.use_cache = True
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = False
