"""LoRA adapters (PEFT) on the components a config names, with vLLM-servability warnings.

Targets are groups — ``language.attention``, ``language.mlp``, ``vision``, ``projector`` — resolved
through the family record to a regex over *full* module names (PEFT matches a string
``target_modules`` with ``re.fullmatch``), or explicit module names/regexes passed through.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Iterable

import torch
import torch.nn as nn

from vlm.errors import ConfigError
from vlm.families import Family

GROUPS = ("language.attention", "language.mlp", "vision", "projector")


def _linear_names(model: nn.Module) -> list[str]:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, so they are found too.
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def resolve_targets(model: nn.Module, family: Family, targets: Iterable[str]) -> list[str]:
    """Full names of the linear modules that get LoRA, in model order."""
    linears = _linear_names(model)
    chosen: set[str] = set()
    for t in targets:
        if t in ("language.attention", "language.mlp"):
            leaves = family.lora_attention if t.endswith("attention") else family.lora_mlp
            hit = [n for n in linears if family.component_of(n) == "language" and n.rsplit(".", 1)[-1] in leaves]
        elif t in ("vision", "projector"):
            hit = [n for n in linears if family.component_of(n) == t]
        else:  # explicit: a leaf name ("q_proj"), a full name, or a regex over full names
            try:
                pat = re.compile(t)
            except re.error as e:
                raise ConfigError(f"lora.targets: {t!r} is not a group ({', '.join(GROUPS)}), a module "
                                  f"name or a valid regex: {e}") from None
            hit = [n for n in linears if n == t or n.endswith("." + t) or pat.fullmatch(n)]
        if not hit:
            raise ConfigError(f"lora.targets: {t!r} matches no linear module of this {family.name} model")
        chosen.update(hit)
    return [n for n in linears if n in chosen]


def names_to_regex(names: list[str]) -> str:
    """An exact-match regex for a list of full module names (compact: one alternative per leaf)."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def vllm_serving_warnings(family: Family, target_names: list[str], r: int,
                          modules_to_save: list[str]) -> list[str]:
    """What vLLM will refuse or ignore in an adapter with these targets.

    The rules live in ``vlm.export.check.vllm_rules`` (one source of truth, also behind
    ``vlm export --check-vllm`` and ``vlm serve``).
    """
    from vlm.export.check import vllm_rules

    return [str(p) for p in vllm_rules(family, target_names, r, modules_to_save)]


def apply_lora(model: nn.Module, family: Family, *, r: int = 16, alpha: float = 16.0,
               dropout: float = 0.0, targets: Iterable[str] = ("language.attention", "language.mlp"),
               modules_to_save: list[str] | None = None, use_rslora: bool = False,
               gradient_checkpointing: bool = False, warn: bool = True,
               frozen_vision_no_grad: bool = True, skip_cast_under_autocast: bool = True) -> Any:
    """Wrap ``model`` in a PEFT ``PeftModel`` with LoRA on the resolved targets.

    ``frozen_vision_no_grad``: run the vision tower under ``torch.no_grad`` while it has no trainable
    parameter (see ``no_grad_when_frozen``); the loss and gradients are unchanged.
    ``skip_cast_under_autocast``: under autocast, skip PEFT's bf16 -> fp32 input cast that autocast
    undoes (``skip_input_cast_under_autocast``); bit-identical results, fewer copies.
    """
    names = resolve_targets(model, family, list(targets))
    if warn:
        for w in vllm_serving_warnings(family, names, r, modules_to_save or []):
            warnings.warn(f"vLLM serving: {w}", stacklevel=2)
    # Unlike peft's prepare_model_for_kbit_training we do not upcast the 16-bit parts to fp32: the
    # protected vision tower and lm_head stay in their load dtype (half the memory); LoRA weights
    # are created in fp32 by PEFT and autocast handles the mixed matmuls.
    for p in model.parameters():
        p.requires_grad_(False)
    # transformers' gradient_checkpointing_enable and PEFT (on a 16-bit model) both call
    # enable_input_require_grads(), which hooks every sub-model's input embeddings, the vision tower's
    # patch embedding included (see below); under the frozen tower's no_grad that hook still marks
    # the patch embeddings as requiring grad, so a compiled first vision block sees both values and
    # recompiles for each. Their calls are no-ops while LoRA is set up; our text-embedding hook stays.
    model.enable_input_require_grads = lambda: None
    try:
        peft_model = _wrap(model, family, names, r=r, alpha=alpha, dropout=dropout,
                           modules_to_save=modules_to_save, use_rslora=use_rslora,
                           gradient_checkpointing=gradient_checkpointing)
    finally:
        del model.enable_input_require_grads   # the class method again
    if frozen_vision_no_grad:
        no_grad_when_frozen(model, family)
    if skip_cast_under_autocast:
        skip_input_cast_under_autocast(peft_model)
    return peft_model


def _wrap(model, family, names, *, r, alpha, dropout, modules_to_save, use_rslora, gradient_checkpointing):
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Non-reentrant checkpointing needs no input that requires grad. transformers'
        # enable_input_require_grads() would also hook the vision tower's patch embedding, making
        # autograd recompute and back-propagate through a frozen tower for nothing (on Qwen2-VL-2B
        # at 8 images of 1024 patches, ~22 TFLOP a step): hook the text embeddings only.
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None:
            emb.register_forward_hook(_output_requires_grad)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names_to_regex(names),
                        modules_to_save=modules_to_save or None, use_rslora=use_rslora, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.vlm_family = family
    return peft_model


def _cast_input_unless_autocast(self, x, dtype):
    # Under autocast the matmuls cast their operands themselves: PEFT's cast of a bf16 activation to
    # the fp32 adapter dtype is undone at once by autocast (bf16 -> fp32 -> bf16 is exact), so skipping
    # it changes no bit and saves two full-size copies per adapter call (and their backward).
    if (isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16)
            and torch.is_autocast_enabled(x.device.type)
            and torch.get_autocast_dtype(x.device.type) == x.dtype):
        return x
    return type(self)._cast_input_dtype(self, x, dtype)


def skip_input_cast_under_autocast(model: nn.Module) -> int:
    """Give each PEFT LoRA layer the autocast-aware input cast above; returns how many."""
    from types import MethodType

    from peft.tuners.lora import LoraLayer

    n = 0
    for mod in model.modules():
        if isinstance(mod, LoraLayer) and hasattr(type(mod), "_cast_input_dtype"):
            mod._cast_input_dtype = MethodType(_cast_input_unless_autocast, mod)
            n += 1
    return n


def _output_requires_grad(module, inputs, output):
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def _frozen_forward(mod, *args, **kwargs):
    if torch.is_grad_enabled() and not any(p.requires_grad for p in mod.parameters()):
        with torch.no_grad():
            return mod._vlm_frozen_orig_forward(*args, **kwargs)
    return mod._vlm_frozen_orig_forward(*args, **kwargs)


def no_grad_when_frozen(model: nn.Module, family: Family) -> list[str]:
    """Run each vision tower under ``torch.no_grad`` while none of its parameters (its projector
    included, where the projector lives inside it) requires grad: no autograd graph, no saved
    activations, no checkpoint recompute for a tower that nothing trains. Checked at every call, so
    unfreezing the tower (or LoRA on it) later restores normal autograd. Returns the wrapped names."""
    from types import MethodType

    wrapped = []
    for prefix, mod in family.component_roots(model, "vision"):
        if "_vlm_frozen_orig_forward" in mod.__dict__:
            continue
        mod._vlm_frozen_orig_forward = mod.forward
        mod.forward = MethodType(_frozen_forward, mod)
        wrapped.append(prefix)
    return wrapped
