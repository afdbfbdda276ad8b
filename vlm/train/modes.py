"""What `method:` trains and how it is saved: ``lora`` (vlm.lora), ``full`` and ``projector``.

- ``full``: every language-model weight (decoder layers, norms, embeddings, lm_head) and the
  projector train; the vision tower too with ``training.train_vision``. Weights stay in their load
  dtype: in bf16 the optimizer is ``BF16AdamW`` (vlm.train.bf16_adamw: no fp32 master copy, updates
  stochastically rounded or Kahan-compensated; norm weights and biases keep an fp32 master), so a
  parameter costs 2 (weight) + 2 (grad) + 4 (moments) bytes instead of Trainer's 16. Refused on a
  4-bit model (QLoRA is ``method: lora`` on a 4-bit policy). Output: ``OUT/model/``, a standard
  checkpoint (safetensors + config + processor) that plain transformers loads.
- ``projector``: LLaVA stage 1: only the family's projector (``Family.component_prefixes
  ["projector"]``) trains; tower and language model frozen. The projector keeps an fp32 master in
  the optimizer (it is small). Output: ``OUT/projector/projector.safetensors`` (full module names,
  the load dtype; the run's metadata in the safetensors header and ``vlmtune.json``) plus the
  processor, which ``model.projector_init`` loads as the start of stage 2 (``vlm train`` with any
  method; with LoRA the projector joins ``modules_to_save`` so the adapter carries it) and plain
  transformers loads with ``model.load_state_dict(safetensors.torch.load_file(path), strict=False)``.
- ``training.optimizer``: ``adamw`` (BF16AdamW, bf16 moments) or, for ``full``, ``adamw_8bit``
  (BF16AdamW with bitsandbytes' blockwise 8-bit moments).
- Under FSDP2 (``distributed.strategy=fsdp``): BF16AdamW steps each process's row shards and keeps
  their states only (vlm.train.bf16_adamw). Checkpoints are torch.distributed.checkpoint folders
  (``full``: the sharded model and optimizer; ``projector``: ``projector.safetensors``, gathered,
  plus the sharded optimizer), resumed by FSDP2 on any process count, or by one process / DDP
  through vlm.train.cross_resume (and the other way round). The outputs are gathered: ``OUT/model``
  the same standard checkpoint one process writes, ``OUT/projector`` the same file. FSDP1
  (``distributed.fsdp_version: 1``) is refused: it flattens parameters into 1-D FlatParameters, so
  the optimizer could not tell a norm weight (fp32 master) from a matrix, nor key its rounding by
  the element's place in the weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm.errors import ConfigError, VlmError
from vlm.train.no_kv_cache import use_cache_as_loaded

MODEL_DIR = "model"
PROJECTOR_DIR = "projector"
PROJECTOR_FILE = "projector.safetensors"
METHODS = ("lora", "full", "projector")


@dataclass
class ModeSetup:
    """What the recipe needs from a non-LoRA method."""
    trainable: dict[str, int]                 # component -> trainable parameters
    optimizer_cls_and_kwargs: tuple | None     # for transformers.Trainer; None: Trainer's own optim
    optimizer: str                            # what the summary reports
    checkpointing: Any = None                 # vlm.train.checkpointing.Decision


def quantized_counts(model) -> dict[str, int]:
    from vlm.quant.loading import quant_metadata

    counts = ((quant_metadata(model) or {}).get("counts") or {}).get("quantized") or {}
    return {k: int(v) for k, v in counts.items() if v}


def check_model(model, family, cfg) -> None:
    """``full`` needs every trained weight in 16/32-bit; ``projector`` needs a 16-bit projector."""
    quantized = quantized_counts(model)
    if cfg.method == "full" and quantized:
        raise ConfigError(
            f"method: full trains every language weight in 16-bit, but this {family.name} model was "
            f"loaded with 4/8-bit layers ({', '.join(f'{k}: {v}' for k, v in quantized.items())}; "
            f"quant: {cfg.quant!r}). Use quant: bf16 (or null) for full fine-tuning, or method: lora "
            "for QLoRA on the quantized model")
    if cfg.method == "projector" and quantized.get("projector"):
        raise ConfigError(f"method: projector trains the projector, which this quant policy stores in "
                          f"4/8 bit (quant: {cfg.quant!r}); keep the projector 16-bit (the dynamic "
                          "presets do)")


def trainable_components(family, cfg) -> tuple[str, ...]:
    if cfg.method == "projector":
        return ("projector",)
    comps = ("language", "embeddings", "lm_head", "projector")
    return comps + ("vision",) if cfg.training.train_vision else comps


def set_trainable(model, family, components: tuple[str, ...]) -> dict[str, int]:
    """Freeze everything, then unfreeze the parameters whose module belongs to ``components``.

    Parameters are assigned through their owning module's name (longest component prefix wins, so
    Qwen2-VL's merger inside the vision tower counts as the projector)."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        comp = family.component_of(name.rsplit(".", 1)[0])
        p.requires_grad_(comp in components)
        if comp in components:
            counts[comp] = counts.get(comp, 0) + p.numel()
    missing = [c for c in components if c in family.component_prefixes and not counts.get(c)
               and c not in ("embeddings", "lm_head")]   # tied / shared with language
    if missing:
        raise VlmError(f"method: {components}: no parameter of {', '.join(missing)} found in this "
                       f"{family.name} model (family component paths: "
                       f"{ {c: family.component_prefixes[c] for c in missing} })")
    return counts


def optimizer_for(model, cfg) -> tuple[tuple | None, str]:
    """(Trainer's optimizer_cls_and_kwargs, a name for the summary).

    16-bit weights get BF16AdamW: ``training.optimizer: adamw`` with bf16 moments,
    ``adamw_8bit`` (``method: full``) with bitsandbytes' blockwise 8-bit moments (2 bytes per
    parameter less; the weight update stays stochastic / Kahan, see vlm.train.bf16_adamw)."""
    from vlm.train.bf16_adamw import BF16AdamW

    low = {p.dtype for p in model.parameters() if p.requires_grad} & {torch.bfloat16, torch.float16}
    if not low:
        return None, cfg.training.optimizer          # fp32 weights: Trainer's own optimizer
    wanted = cfg.training.optimizer
    if wanted == "adamw_8bit" and cfg.method == "projector":
        raise ConfigError(
            "training.optimizer: adamw_8bit: method: projector keeps an fp32 master copy and fp32 "
            "moments for the (small) projector, so 8-bit moments would save nothing; use adamw")
    if wanted not in ("adamw", "adamw_8bit"):
        raise ConfigError(
            f"training.optimizer: {wanted} updates 16-bit weights with round-to-nearest, "
            "where small updates are lost (training stalls); method full/projector on 16-bit weights "
            "uses adamw (BF16AdamW: stochastic rounding or training.bf16_update: kahan) or, for "
            "method: full, adamw_8bit (the same with 8-bit moments)")
    eight_bit = wanted == "adamw_8bit"
    kwargs = dict(lr=cfg.training.lr, betas=(0.9, 0.999), eps=1e-8, rounding=cfg.training.bf16_update,
                  fp32_master="all" if cfg.method == "projector" else "small", seed=cfg.training.seed,
                  **({"state_dtype": "8bit"} if eight_bit else {}))
    name = ("bf16_adamw (fp32 master)" if cfg.method == "projector"
            else f"bf16_adamw ({cfg.training.bf16_update}{', 8-bit moments' if eight_bit else ''})")
    return (BF16AdamW, kwargs), name


def bytes_per_parameter(model, optimizer) -> dict | None:
    """What each trained parameter holds during a step, in bytes: its weight, its gradient (same
    dtype as the weight while a step runs) and the optimizer's state (after the first step); under
    FSDP2 per element of this process's shards (weights, grads and states are all sharded)."""
    from vlm.train.bf16_adamw import optimizer_bytes_per_parameter

    from vlm.train.bf16_adamw import _local

    trained = [_local(p) for p in model.parameters() if p.requires_grad]   # FSDP2: this process's shards
    n = sum(p.numel() for p in trained)
    if not n or optimizer is None:
        return None
    weights = sum(p.numel() * p.element_size() for p in trained) / n
    state = optimizer_bytes_per_parameter(optimizer)
    if state != state:          # NaN: no optimizer state yet
        return None
    return {"weights": round(weights, 4), "grads": round(weights, 4), "optimizer": round(state, 4),
            "total": round(2 * weights + state, 4)}


def prepare(model, family, cfg, *, device: str | None = None, strategy: str = "single") -> ModeSetup:
    """Set up ``full`` or ``projector`` training on a loaded model (in place). Gradient
    checkpointing as ``vlm.train.checkpointing.resolve`` decides for ``device`` (default: where the
    model is) and the process ``strategy``."""
    from vlm.lora import _output_requires_grad, no_grad_when_frozen
    from vlm.train import checkpointing

    check_model(model, family, cfg)
    counts = set_trainable(model, family, trainable_components(family, cfg))
    decision = checkpointing.resolve(model, cfg, device or str(next(model.parameters()).device), strategy)
    if decision.enabled:
        # transformers' gradient_checkpointing_enable calls enable_input_require_grads(), which hooks
        # every input embedding, the vision tower's patch embedding included: its output would then
        # require grad under the frozen tower's no_grad (a second variant of a compiled first vision
        # block, as vlm.lora explains). Non-reentrant checkpointing needs no such hook: full trains the
        # text embeddings, projector gets the text-embedding hook below.
        model.enable_input_require_grads = lambda: None
        try:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        finally:
            del model.enable_input_require_grads   # the class method again
        if cfg.method == "projector":
            # the frozen language model's checkpointed layers get their grad path through the image
            # embeddings; text-only batches need the text embeddings to carry one (as in vlm.lora)
            emb = model.get_input_embeddings()
            emb.register_forward_hook(_output_requires_grad)
    no_grad_when_frozen(model, family)
    opt, name = optimizer_for(model, cfg)
    return ModeSetup(trainable=counts, optimizer_cls_and_kwargs=opt, optimizer=name, checkpointing=decision)


def load_checkpoint_weights(model, checkpoint: str | Path) -> int:
    """Put a Trainer checkpoint's weights into ``model`` (resume of ``full`` / ``projector``), before
    any FSDP sharding: from the safetensors one process / DDP wrote, or (``_from_dcp``) the sharded
    folder FSDP2 wrote, read whole.

    Why not Trainer's own resume: save_pretrained writes the checkpoint under the original (legacy)
    names (``model.layers.0...`` for Qwen2-VL's ``model.language_model.layers.0...``), and Trainer
    loads it back with ``load_state_dict(strict=False)``, which then matches no key and silently
    resumes from the *base* weights (seen: the resumed loss jumped back to the step-0 loss). Loading
    through ``from_pretrained`` applies transformers' name conversion; every tensor must land."""
    import torch

    from vlm.train.cross_resume import FSDP_MODEL

    if (Path(checkpoint) / FSDP_MODEL).is_dir():
        return _from_dcp(model, Path(checkpoint))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = type(base).from_pretrained(str(checkpoint), dtype=base.dtype, device_map="cpu")
    state = saved.state_dict()
    own = base.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise VlmError(f"--resume: {checkpoint} lacks weights of this model: {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])
    del saved
    return len(own)


def _from_dcp(model, checkpoint: Path) -> int:
    """An FSDP2 checkpoint's model folder (tensors under the live model's own names) into ``model``."""
    from vlm.train.cross_resume import FSDP_MODEL, read_dcp

    saved = read_dcp(checkpoint / FSDP_MODEL, "model")
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    if missing:
        raise VlmError(f"--resume: {checkpoint / FSDP_MODEL} lacks weights of this model: {', '.join(missing[:5])}")
    bad = [k for k in own if tuple(saved[k].shape) != tuple(own[k].shape)]
    if bad:
        raise VlmError(f"--resume: {checkpoint / FSDP_MODEL}: {bad[0]} is {tuple(saved[bad[0]].shape)} there, "
                       f"{tuple(own[bad[0]].shape)} here: not this model")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(saved[name])
    return len(own)


def resume_weights(model, family, checkpoint: str | Path) -> int:
    """The trained weights of a ``full`` / ``projector`` checkpoint into ``model``: a projector
    checkpoint holds ``projector.safetensors`` only (``save_projector_checkpoint``); a full one (or a
    projector checkpoint written before that) the whole model."""
    if (Path(checkpoint) / PROJECTOR_FILE).is_file():
        return load_projector(model, family, Path(checkpoint) / PROJECTOR_FILE)
    return load_checkpoint_weights(model, checkpoint)


def save_projector_checkpoint(model, family, folder: str | Path, *, write: bool = True) -> Path:
    """A ``method: projector`` checkpoint's weights: the projector alone, in its training dtype (the
    frozen tower and language model are the base's; the optimizer's fp32 master is in optimizer.pt).
    At LLaVA-1.5-7B: 21 M parameters, ~40 MB, instead of the whole 14 GB model per checkpoint.
    Under FSDP2 every process calls it (the projector is gathered) and ``write`` says who writes."""
    from safetensors.torch import save_file

    path = Path(folder) / PROJECTOR_FILE
    tensors = projector_state_dict(model, family)
    if write:
        save_file(tensors, str(path), metadata={"format": "pt"})
    return path


# ---- projector files ------------------------------------------------------------------------------

def projector_state_dict(model, family) -> dict[str, torch.Tensor]:
    """The projector's tensors under their full names in the *ForConditionalGeneration model, whole
    (under FSDP2 gathered from the shards: a collective, every process calls it)."""
    from torch.distributed.tensor import DTensor

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, t in base.state_dict().items():
        if family.component_of(name.rsplit(".", 1)[0]) == "projector":
            t = t.full_tensor() if isinstance(t, DTensor) else t
            out[name] = t.detach().cpu().contiguous()
    return out


def gathered_output_state(model, family, cfg) -> dict[str, torch.Tensor] | None:
    """What ``save_output`` writes, whole, from an FSDP2-sharded model (a collective: every process
    calls it): ``full``: the model's state dict on the main process's CPU only (one weight at a time
    is gathered, so no GPU holds the whole model); ``projector``: the projector's tensors."""
    if cfg.method == "projector":
        return projector_state_dict(model, family)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (lm_head = embed_tokens) comes back as two gathered copies; as one tensor under both
    # names save_pretrained drops the tied name, as it does for one process's model (the same files)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        kept = [n for n in group if n in state]
        for n in kept[1:]:
            state[n] = state[kept[0]]
    return state


def load_projector(model, family, path: str | Path) -> int:
    """Load a projector-only safetensors (``method: projector``'s output, a file or its folder)
    into ``model``; every tensor must be a projector tensor of this model with the same shape."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / PROJECTOR_FILE
    if not p.is_file():
        raise VlmError(f"model.projector_init: {p} does not exist (give a {PROJECTOR_FILE} or the "
                       "folder method: projector wrote)")
    if quantized_counts(model).get("projector"):
        raise VlmError(f"model.projector_init: this {family.name} model's projector was loaded in 4/8 bit "
                       "by the quant policy; a 16-bit projector file cannot be copied into it (keep the "
                       "projector 16-bit: the dynamic presets do, or quant: bf16)")
    try:
        tensors = load_file(str(p))
    except Exception as e:   # not a safetensors file, truncated, ...
        raise VlmError(f"model.projector_init: {p} is not a readable safetensors file: {e}") from None
    own = projector_state_dict(model, family)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise VlmError(f"model.projector_init: {p} holds tensors that are not this {family.name} "
                       f"model's projector: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise VlmError(f"model.projector_init: {p} lacks projector tensors {', '.join(missing[:5])}")
    bad = [f"{k}: {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in tensors
           if tensors[k].shape != own[k].shape]
    if bad:
        raise VlmError(f"model.projector_init: {p}: shapes differ from this model's projector: "
                       + "; ".join(bad[:3]))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        for name, t in tensors.items():
            base.get_parameter(name).copy_(t) if _is_param(base, name) else base.get_buffer(name).copy_(t)
    return len(tensors)


def lora_modules_to_save(model, family, cfg) -> list[str]:
    """``lora.modules_to_save`` for a LoRA run, plus the projector when it starts from
    ``model.projector_init``: a PEFT adapter holds only what it trained, so without a full copy of the
    stage-1 projector the adapter on the original base (PEFT, vLLM, ``vlm export --merged``) would
    silently run the base's projector. As in LLaVA-1.5's stage 2, the projector then trains too.
    A projector root that is a container (Qwen3-VL's DeepStack merger list) is named by its children:
    PEFT wraps modules, not lists."""
    names = list(cfg.lora.modules_to_save)
    if not cfg.model.projector_init:
        return names
    for prefix, root in family.component_roots(model, "projector"):
        parts = ([f"{prefix}.{child}" for child, _ in root.named_children()]
                 if isinstance(root, (torch.nn.ModuleList, torch.nn.ModuleDict)) else [prefix])
        names += [p for p in parts if p not in names]
    return names


def _is_param(model, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def save_output(model, processor, out: Path, *, cfg, resolution, state_dict: dict | None = None) -> Path:
    """``full``: OUT/model (standard checkpoint); ``projector``: OUT/projector (projector-only
    safetensors). Both with the processor and ``vlmtune.json``; written atomically.
    ``state_dict``: ``gathered_output_state``'s whole tensors when the model is sharded (FSDP2)."""
    from safetensors.torch import save_file

    from vlm.atomic import replacing_folder, write_json
    from vlm.checkpoint_layout import save_model
    from vlm.data_formats.resolution import save_resolution
    from vlm.train.config import to_plain

    family = model.vlm_family
    target = out / (MODEL_DIR if cfg.method == "full" else PROJECTOR_DIR)
    meta = {"vlmtune": {"method": cfg.method, "base_model": cfg.model.path, "family": family.name,
                        "projector_init": cfg.model.projector_init,
                        "training": to_plain(cfg.training)}}
    with replacing_folder(target) as tmp:
        if cfg.method == "full":
            with use_cache_as_loaded(model):   # the checkpoint's own generation setting, not training's
                save_model(model, tmp, family, safe_serialization=True,   # hub names: vLLM serves it
                           **({} if state_dict is None else {"state_dict": state_dict}))
        else:
            tensors = projector_state_dict(model, family) if state_dict is None else state_dict
            dtype = model.dtype
            save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                      str(tmp / PROJECTOR_FILE),
                      metadata={"format": "pt", "vlmtune": json.dumps(meta["vlmtune"], default=str)})
        processor.save_pretrained(tmp)
        write_json(tmp / "vlmtune.json", meta)
        save_resolution(tmp, resolution)
    return target


def describe(setup: ModeSetup, cfg) -> str:
    parts = ", ".join(f"{k} {v:,}" for k, v in setup.trainable.items())
    return f"method: {cfg.method}: training {sum(setup.trainable.values()):,} parameters ({parts}); " \
           f"optimizer {setup.optimizer}" + (f"; {setup.checkpointing.line()}" if setup.checkpointing else "")


def summary_fields(setup: Any, cfg) -> dict:
    out = {"method": cfg.method,
           "optimizer": setup.optimizer if setup is not None else cfg.training.optimizer}
    if setup is not None and setup.checkpointing is not None:
        out["gradient_checkpointing"] = setup.checkpointing.enabled
        out["gradient_checkpointing_reason"] = setup.checkpointing.reason
    return out
