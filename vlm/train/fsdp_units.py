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

- decoder layers in units of ``distributed.fsdp_layers_per_unit`` consecutive layers (``Layout``,
  ``layer_groups``; auto: up to ``AUTO_UNIT_BYTES`` of 16-bit weights per unit). At 7B one layer
  (233 M parameters, 466 MB in bf16, plus one prefetched) is already the most weight a unit should
  hold whole: one per unit, the memory case keeps 1/N of everything else. At 2B a layer is 94 MB and
  the step is host-bound in FSDP2's per-unit hooks: five layers share a unit (6 units, not 28);
- one unit per vision tower when nothing in it trains (``fsdp_frozen_towers: replicate``: none — the
  frozen tower is left out of FSDP, whole on every process, no hooks or all-gather at all) (``family.component_roots(model, "vision")``:
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
    # a unit is an FSDP state: the layers of one group (fsdp_units.shard_model) share one
    states = {id(m._get_fsdp_state()) for m in units}
    report = {"parameter_bytes_this_process": local, "parameter_bytes_whole": whole, "fsdp_units": len(states)}
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
        replicated = 0
        for name, p in model.named_parameters():
            if not isinstance(p, DTensor):   # left out of FSDP (ignored_params): whole on every process
                replicated += _nbytes(p)
            elif id(p) not in inner:
                module = name.rsplit(".", 1)[0]
                root[module] = root.get(module, 0) + _nbytes(p)
        report["root_unit_bytes_whole"] = sum(root.values())
        report["replicated_bytes"] = replicated
        report["root_unit_modules"] = sorted(root, key=lambda k: -root[k])[:8]
        mp = getattr(model._get_fsdp_state(), "_mp_policy", None)   # what the units were built with
        if mp is not None:
            report["mixed_precision"] = {k: None if getattr(mp, k) is None else str(getattr(mp, k)).replace("torch.", "")
                                         for k in ("param_dtype", "reduce_dtype", "output_dtype")}
    return report


def unit_classes(model, family, replicate_frozen_towers: bool = False, tower_blocks: bool = False) -> list[str] | None:
    """Class names for accelerate's ``transformer_layer_cls_to_wrap``: the decoder layer's, and per
    vision tower the tower's own class when nothing in it trains (LoRA on the language model: one
    unit, module doc) or its block class when something does (method full / projector, vision LoRA:
    a unit per block, so its backward gathers one block at a time). None when this model has no
    decoder layers where the family says (accelerate's default cut then applies).
    ``replicate_frozen_towers``: a frozen tower is no unit at all (``distributed.fsdp_frozen_towers:
    replicate``: its parameters are left out of FSDP by ``Layout.pre_wrap``). ``tower_blocks``
    (``fsdp_frozen_towers: blocks``): a frozen tower is cut per block too (its forward then holds
    one block and the prefetched next one whole, not the whole tower: ``configure_prefetch``)."""
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
        if frozen and replicate_frozen_towers:
            continue
        for name in ([type(tower).__name__] if frozen and not tower_blocks else
                     sorted({type(m).__name__ for m in tower.modules()} & blocks)):
            if name not in names:
                names.append(name)
    return names


def decoder_units(model, family) -> list:
    """One FSDP module per decoder unit, in forward order: each layer when a layer is a unit, the
    first layer of each group when several share one (``shard_model``: they share one state)."""
    from torch.distributed.fsdp import FSDPModule

    from vlm.train.compile import language_layers

    units, seen = [], set()
    for m in language_layers(model, family):
        if isinstance(m, FSDPModule) and id(m._get_fsdp_state()) not in seen:
            seen.add(id(m._get_fsdp_state()))
            units.append(m)
    return units


def configure_prefetch(model, family) -> dict:
    """Explicit all-gather prefetch between the FSDP2 units of ``model`` (module doc); returns what
    it set, for the sharding report. No-op outside FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    from vlm.train.compile import language_layers, vision_blocks

    if not isinstance(model, FSDPModule):
        return {}
    layers = decoder_units(model, family)
    towers = [t for _, t in family.component_roots(model, "vision") if isinstance(t, FSDPModule)]
    if not layers:
        return {}
    for prev, nxt in zip(layers, layers[1:]):
        prev.set_modules_to_forward_prefetch([nxt])
        nxt.set_modules_to_backward_prefetch([prev])
    starters = towers
    blocks = [b for b in (vision_blocks(model, family) if family.vision_blocks else []) if isinstance(b, FSDPModule)]
    if blocks and not towers:   # a unit per vision block: each starts the next one's all-gather
        for prev, nxt in zip(blocks, blocks[1:]):
            prev.set_modules_to_forward_prefetch([nxt])
        starters = blocks[-1:]
    if not starters:   # towers replicated (or none): the input embeddings' unit starts the first layer's
        embed = getattr(model, "get_input_embeddings", lambda: None)()
        starters = [embed] if isinstance(embed, FSDPModule) and embed not in layers else []
    for unit in starters:   # runs before the decoder: its start fetches the first decoder unit
        unit.set_modules_to_forward_prefetch([layers[0]])

    def targets(m, kind):    # read back from FSDP's state: what each unit will prefetch
        return getattr(m._get_fsdp_state(), f"_states_to_{kind}_prefetch", [])

    states = [id(m._get_fsdp_state()) for m in language_layers(model, family) if isinstance(m, FSDPModule)]
    sizes = [states.count(id(u._get_fsdp_state())) for u in layers]
    fwd = sum(1 for m in layers + list(dict.fromkeys(blocks + starters)) if targets(m, "forward"))
    bwd = sum(1 for m in layers if targets(m, "backward"))
    return {"decoder_unit_layers": sizes,   # decoder layers in each unit, in order
            "forward_prefetch": f"{fwd} units start the next decoder unit's all-gather as they start"
                                f" ({len(layers) - 1} decoder units, {len(towers)} whole vision tower units"
                                + (f", {len(blocks)} vision block units" if blocks and not towers else "")
                                + ("" if towers or blocks or not starters else ", the input embeddings") + ")",
            "backward_prefetch": f"{bwd} decoder units start the previous unit's all-gather"}


class Layout:
    """The ``distributed.fsdp_*`` layout knobs, applied around accelerate's wrapping.

    ``pre_wrap`` runs just before accelerate would shard the model (``VlmTrainer._apply_fsdp_layout``):
    frozen vision towers left out of FSDP (``replicate_towers``: accelerate's ``ignored_modules``,
    i.e. FSDP2's ``ignored_params``: whole on every process, no unit, no hooks, no all-gather; frozen,
    so no gradient to sync), the decoder layers cut into groups, and the whole model sharded unit by
    unit (``shard_model``).
    ``callback`` sets the prefetch once the units exist and records the layout for the summary."""

    def __init__(self, family, layers_per_unit: int = 1, replicate_towers: bool = False,
                 reshard_after_forward: bool = True, say=print):
        self.family, self.layers_per_unit, self.replicate_towers = family, layers_per_unit, replicate_towers
        self.reshard_after_forward, self.say = reshard_after_forward, say
        self.groups: list[list] = []
        self.replicated_bytes = 0
        self.applied = False

    def pre_wrap(self, model, accelerator) -> None:
        """Apply the layout and shard the model unit by unit (``shard_model``). Holds no reference to
        a weight: each unit's unsharded weights are freed as soon as it is sharded."""
        self.applied = True
        plugin = accelerator.state.fsdp_plugin
        if self.replicate_towers and not isinstance(plugin.ignored_modules, str):
            towers = frozen_towers(model, self.family)
            plugin.ignored_modules = list(plugin.ignored_modules or []) + towers
            self.replicated_bytes = sum(_nbytes(p) for t in towers for p in t.parameters())
            del towers
        self.groups = shard_model(model, self.family, accelerator, self.layers_per_unit) or []

    def describe(self) -> dict:
        out = {}
        if self.replicated_bytes:
            out["frozen_towers"] = (f"replicated: {self.replicated_bytes / 2**20:.1f} MiB whole on every process, "
                                    "no FSDP unit (frozen: nothing to gather or reduce)")
        out["reshard_after_forward"] = (
            "decoder units and vision towers freed after forward, gathered again for backward"
            if self.reshard_after_forward else
            "false: every unit kept gathered from its forward to its backward (the whole model on each "
            "process during the step)")
        out["gradient_sync"] = ("reduce-scatter on the last micro-batch of each optimizer step only "
                                "(no_sync: set_requires_gradient_sync(False) before it); trainable parameters only")
        return out

    def callback(self):
        from transformers import TrainerCallback

        layout = self

        class FsdpLayout(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if model is None or "_vlm_fsdp_layout" in model.__dict__:
                    return
                prefetch = configure_prefetch(model, layout.family)
                if not prefetch:
                    return
                model._vlm_fsdp_layout = {**prefetch, **layout.describe()}
                layout.say("fsdp layout: " + "; ".join(f"{k} {v}" for k, v in model._vlm_fsdp_layout.items()))

        return FsdpLayout()


# Auto layers per unit: consecutive decoder layers join one unit up to this many bytes of their
# compute-dtype weights. One Qwen2-VL-7B layer (~445 MiB in bf16) is over it alone: one layer per
# unit, the memory layout; a 2B layer (~89 MiB) groups by 5, so the unit whole plus the prefetched
# one hold about what one 7B layer and its prefetch hold, with a fifth of the units' hooks.
AUTO_UNIT_BYTES = 512 * 2**20


def _compute_bytes(module, compute_dtype) -> int:
    """Bytes of ``module``'s parameters once all-gathered for compute (``param_dtype`` when set)."""
    size = torch.finfo(compute_dtype).bits // 8 if compute_dtype is not None else None
    return sum(p.numel() * (size or p.element_size()) for p in module.parameters())


def layer_groups(layers, setting: int, compute_dtype=None, budget: int = AUTO_UNIT_BYTES) -> list[list]:
    """Consecutive decoder layers cut into FSDP2 units: the fewest groups of at most ``setting``
    layers, as equal as they come (28 by 3: eight of 3, two of 2), or with ``setting`` 0 (auto) of at
    most as many layers as fit ``budget`` bytes of compute-dtype weights (one layer per unit when one
    layer alone is over it)."""
    layers = list(layers)
    if not layers:
        return []
    if setting > 0:
        n = setting
    else:
        largest = max(_compute_bytes(layer, compute_dtype) for layer in layers)
        n = max(1, budget // max(largest, 1))
    # equal-size groups: 28 layers by at most 5 -> 6 groups of 5,5,5,5,4,4 (not 5×5 + 3)
    groups, count = [], -(-len(layers) // n)
    base, extra = divmod(len(layers), count)
    start = 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        groups.append(layers[start:start + size])
        start += size
    return groups


def shard_model(model, family, accelerator, setting: int) -> list[list] | None:
    """Cut ``model`` into FSDP2 units, one unit at a time, before accelerate would: the decoder layers
    in groups (``layer_groups``), then accelerate's own cut for the rest — the classes it is told to
    wrap (``unit_classes``: the vision towers or their blocks), bottom-up; the input embeddings; the
    "tail" (final norm + lm_head, kept gathered from forward to backward; tied embeddings join it);
    the root. accelerate's ``fsdp2_prepare_model`` then finds an FSDP model and leaves it as is.
    Returns the decoder layer groups; None when accelerate keeps the whole cut (a device mesh,
    ``cpu_ram_efficient_loading``, or an accelerate without the helpers mirrored here).

    Why not leave the rest to accelerate: its ``fsdp2_prepare_model`` keeps ``model.state_dict()``
    (every unsharded weight) alive until the last unit is sharded, so each process held the whole
    model *and* its shards at once (2 x H200, Qwen2-VL-7B, 16-bit: load peak 23.47 GiB per GPU =
    the 15.59 GiB model + its 7.8 GiB half). Here a unit's unsharded weights are freed when its
    ``fully_shard`` returns (nothing else may hold them: ``VlmTrainer._apply_fsdp_layout`` lifts the
    optimizer's references meanwhile), so the peak is the model as loaded, falling as it is sharded;
    from a host-staged model (``vlm.train.distributed.staging_device``) ``fully_shard`` moves each
    unit to the GPU as it shards it: the GPU holds the shards so far plus one unit.

    The keywords are the ones accelerate uses for its units (the plugin's reshard, offload and
    mixed-precision policy, its ignored modules, frozen uint8 4-bit storage left unsharded), after
    the same fp32 upcast of trainable weights it applies under mixed precision."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from vlm.train.compile import language_layers

    try:
        from accelerate.utils.fsdp_utils import _find_final_norm, get_module_children_bottom_up
    except ImportError:   # another accelerate: its own cut (and its load peak) applies
        return None
    plugin = accelerator.state.fsdp_plugin
    if (getattr(accelerator, "torch_device_mesh", None) is not None or isinstance(model, FSDPModule)
            or getattr(plugin, "cpu_ram_efficient_loading", False) or isinstance(plugin.ignored_modules, str)):
        return None   # (ignored_modules as a name pattern: accelerate resolves and moves those itself)
    try:
        layers = [m for m in language_layers(model, family) if not isinstance(m, FSDPModule)]
    except ValueError:
        layers = []
    mp = plugin.mixed_precision_policy or MixedPrecisionPolicy()
    has_4bit = any(type(p).__name__ == "Params4bit" for p in model.parameters())
    if accelerator.mixed_precision != "no" and not has_4bit:   # accelerate's rule, applied before it would
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.to(torch.float32)
    ignored = {p for m in (plugin.ignored_modules or []) if isinstance(m, torch.nn.Module) for p in m.parameters()}
    ignored |= {p for p in model.parameters() if type(p).__name__ == "Params4bit" and not p.requires_grad
                and not p.is_floating_point()}   # uint8 4-bit storage: accelerate leaves it unsharded too
    for m in plugin.ignored_modules or []:   # fully_shard moves only what it shards to the device
        m.to(accelerator.device)
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
              "mp_policy": mp}

    def shard(modules, **override):
        # (no set of the unit's parameters here: it would keep them alive through fully_shard)
        mine = {p for m in (modules if isinstance(modules, list) else [modules]) for p in m.parameters()
                if p in ignored}
        fully_shard(modules, **{**kwargs, **override}, **({"ignored_params": mine} if mine else {}))

    groups = layer_groups(layers, setting, mp.param_dtype)
    for group in groups:
        shard(group if len(group) > 1 else group[0])
    names = set(getattr(plugin, "transformer_cls_names_to_wrap", None) or getattr(model, "_no_split_modules", None)
                or [])
    for module in get_module_children_bottom_up(model)[:-1]:
        inner = getattr(module, "_checkpoint_wrapped_module", module)
        if type(inner).__name__ in names and not isinstance(module, FSDPModule):
            shard(module)
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    tied = getattr(embed, "weight", None) is not None and getattr(embed, "weight", None) is getattr(head, "weight", 0)
    if not tied and embed is not None and not isinstance(embed, FSDPModule):
        shard(embed)
    tail = [m for m in ((_find_final_norm(model), embed, head) if tied else (_find_final_norm(model), head))
            if m is not None and not isinstance(m, FSDPModule)]
    if tail:
        shard(tail, reshard_after_forward=False)
    # the root: torch's default for it (not resharded after forward), as accelerate leaves it
    fully_shard(model, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"},
                **({"ignored_params": ignored} if ignored else {}))
    # every class is an FSDP unit now (renamed FSDP<Class>): accelerate must not look for them again
    plugin.transformer_cls_names_to_wrap = []
    return groups


def frozen_towers(model, family) -> list:
    """The vision towers in which nothing trains (candidates for ``fsdp_frozen_towers: replicate``)."""
    return [t for _, t in family.component_roots(model, "vision")
            if not any(p.requires_grad for p in t.parameters())]
