"""What FSDP2 holds where: each process's parameter bytes, the units, and the root unit's share.

FSDP2 all-gathers a unit's parameters before the unit runs and frees them after
(``reshard_after_forward``); the *root* unit (the whole model) keeps its own parameters gathered
from the start of forward to the end of backward, so whatever is in no smaller unit stays whole on
every GPU for the entire step.

How the model is cut (``unit_classes``, handed to accelerate as the classes to wrap; measured on the
tiny Qwen2-VL by tests/vlm/train/test_fsdp_layout.py) and why, for LoRA on packed rows
(2 x H200, Qwen2-VL-2B: FSDP2 eager with accelerate's default cut reached 1.07x one GPU where DDP
reached 1.91x; an eager step there is host-bound, so every unit's hooks and every all-gather the
GPU waits for adds to the step):

- one unit per decoder layer: the unit a layer's backward needs, and the most weight one unit holds
  whole (Qwen2-VL-7B: 233 M parameters, 466 MB in bf16, plus one prefetched: the memory case keeps
  1/N of everything else);
- one unit per vision tower when nothing in it trains (``family.component_roots(model, "vision")``:
  blocks, patch embedding and merger together) instead of one per vision block (still the cut when
  the tower trains: method full / projector, vision LoRA): the frozen tower runs once per micro-batch
  under no_grad, so 32 units' hooks and 32 all-gathers become one (Qwen2-VL's tower: 675 M
  parameters, 1.35 GB whole for the tower's forward only, before any decoder activation exists, so
  the step's peak — the decoder's backward — does not grow);
- the input embeddings a unit of their own (reshard after forward), lm_head with the final norm
  accelerate's "tail" unit, kept gathered from forward to backward (tied embeddings, Qwen2-VL-2B:
  the embeddings join the tail); the root holds what is left (LLaVA's projector, for one);
- forward prefetch (``configure_prefetch``): the vision tower's unit and each decoder layer's issue
  the all-gather of the next decoder layer as they start, so it runs on FSDP's all-gather stream
  beside the current layer's kernels instead of in front of the next layer's (FSDP2 prefetches
  nothing in forward by default). Backward: each layer prefetches the one before it (FSDP2's own
  default, set explicitly). Cost: one more layer whole at a time (7B: 466 MB);
- ``distributed.fsdp_reshard_after_forward`` (default true): false keeps every unit gathered from
  its forward to its backward: no backward all-gathers, but the whole 16-bit model on
  every GPU during the step (7B: ~15 GB, the memory FSDP saves for LoRA);
- gradient accumulation: Trainer runs every micro-batch but the last under accelerate's
  ``no_sync``, which for FSDP2 is ``set_requires_gradient_sync(False)``: gradients accumulate
  unsharded (LoRA: a few MB) and are reduce-scattered once, on the last micro-batch. Frozen weights
  have no gradients, so nothing of them is reduced at all; LoRA's fp32 weights are all-gathered in
  the compute dtype with the layer's bf16 weights (``mixed_precision.param_dtype``).
"""

from __future__ import annotations

import torch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def sharding_report(model) -> dict:
    """This process's parameter bytes (its shards) and the whole model's, and the FSDP2 units: how
    many, what the root unit holds whole through forward and backward (bytes, and the modules by
    size), and the mixed-precision policy they run with (``vlm.train.distributed.fsdp2_precision``)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for p in model.parameters():
        whole += _nbytes(p)
        local += _nbytes(p._local_tensor if isinstance(p, DTensor) else p)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    report = {"parameter_bytes_this_process": local, "parameter_bytes_whole": whole, "fsdp_units": len(units)}
    kinds: dict[str, int] = {}
    for m in units:
        if m is not model:
            kinds[type(m).__name__.removeprefix("FSDP")] = kinds.get(type(m).__name__.removeprefix("FSDP"), 0) + 1
    if kinds:
        report["unit_classes"] = kinds
    layout = getattr(model, "_vlm_fsdp_layout", None)
    if layout:
        report["layout"] = layout
    if isinstance(model, FSDPModule):
        inner = {id(p) for m in units if m is not model for p in m.parameters()}
        root: dict[str, int] = {}
        for name, p in model.named_parameters():
            if id(p) not in inner:
                module = name.rsplit(".", 1)[0]
                root[module] = root.get(module, 0) + _nbytes(p)
        report["root_unit_bytes_whole"] = sum(root.values())
        report["root_unit_modules"] = sorted(root, key=lambda k: -root[k])[:8]
        mp = getattr(model._get_fsdp_state(), "_mp_policy", None)   # what the units were built with
        if mp is not None:
            report["mixed_precision"] = {k: None if getattr(mp, k) is None else str(getattr(mp, k)).replace("torch.", "")
                                         for k in ("param_dtype", "reduce_dtype", "output_dtype")}
    return report


def unit_classes(model, family) -> list[str] | None:
    """Class names for accelerate's ``transformer_layer_cls_to_wrap``: the decoder layer's, and per
    vision tower the tower's own class when nothing in it trains (LoRA on the language model: one
    unit, module doc) or its block class when something does (method full / projector, vision LoRA:
    a unit per block, so its backward gathers one block at a time). None when this model has no
    decoder layers where the family says (accelerate's default cut then applies)."""
    from vlm.train.compile import language_layers, vision_blocks

    try:
        layers = language_layers(model, family)
    except ValueError:
        return None
    names = list(dict.fromkeys(type(layer).__name__ for layer in layers))   # Mllama: two layer kinds
    blocks = {type(b).__name__ for b in vision_blocks(model, family)} if family.vision_blocks else set()
    for _, tower in family.component_roots(model, "vision"):
        frozen = not any(p.requires_grad for p in tower.parameters())
        if any(type(m).__name__ in names[:1] for m in tower.modules()):
            continue   # a "tower" that holds the decoder: leave it to the layers' units
        for name in ([type(tower).__name__] if frozen else
                     sorted({type(m).__name__ for m in tower.modules()} & blocks)):
            if name not in names:
                names.append(name)
    return names


def configure_prefetch(model, family) -> dict:
    """Explicit all-gather prefetch between the FSDP2 units of ``model`` (module doc); returns what
    it set, for the sharding report. No-op outside FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    from vlm.train.compile import language_layers

    if not isinstance(model, FSDPModule):
        return {}
    layers = [m for m in language_layers(model, family) if isinstance(m, FSDPModule)]
    towers = [t for _, t in family.component_roots(model, "vision") if isinstance(t, FSDPModule)]
    if not layers:
        return {}
    for prev, nxt in zip(layers, layers[1:]):
        prev.set_modules_to_forward_prefetch([nxt])
        nxt.set_modules_to_backward_prefetch([prev])
    for tower in towers:     # the tower runs before the decoder: its start fetches the first layer
        tower.set_modules_to_forward_prefetch([layers[0]])

    def targets(m, kind):    # read back from FSDP's state: what each unit will prefetch
        return getattr(m._get_fsdp_state(), f"_states_to_{kind}_prefetch", [])

    fwd = sum(1 for m in layers + towers if targets(m, "forward"))
    bwd = sum(1 for m in layers if targets(m, "backward"))
    return {"forward_prefetch": f"{fwd} units start the next decoder layer's all-gather as they start"
                                f" ({len(layers) - 1} decoder layers, {len(towers)} whole vision tower units)",
            "backward_prefetch": f"{bwd} decoder layers start the previous layer's all-gather"}


def layout_callback(family, reshard_after_forward: bool, say=print):
    """A TrainerCallback that sets the prefetch once accelerate has built the units (the model is
    wrapped in place at the start of training) and records the whole layout on the model for
    ``sharding_report``; ``say`` prints it (main process)."""
    from transformers import TrainerCallback

    class FsdpLayout(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None or "_vlm_fsdp_layout" in model.__dict__:
                return
            prefetch = configure_prefetch(model, family)
            if not prefetch:
                return
            model._vlm_fsdp_layout = {
                **prefetch,
                "reshard_after_forward": ("decoder layers and vision towers freed after forward, gathered "
                                          "again for backward" if reshard_after_forward else
                                          "false: every unit kept gathered from its forward to its "
                                          "backward (the whole model on each process during the step)"),
                "gradient_sync": "reduce-scatter on the last micro-batch of each optimizer step only "
                                 "(no_sync: set_requires_gradient_sync(False) before it); trainable "
                                 "parameters only",
            }
            say("fsdp layout: " + "; ".join(f"{k} {v}" for k, v in model._vlm_fsdp_layout.items()))

    return FsdpLayout()
