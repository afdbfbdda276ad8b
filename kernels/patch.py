"""``vlm.kernels.patch(model, family)``: route a VLM's language side through our Triton kernels.

The family record (``family.language_kernels``, see ``vlm.families.base.LanguageKernels``) says what
the decoder's math is; each op's file holds its kernel and its dispatch (what it swaps and how):

- ``rms_norm`` (rms_norm.py): every ``*RMSNorm`` under the language model becomes a
  ``TritonRMSNorm`` holding the *same* weight Parameter, with the family's weight offset (Gemma:
  ``(1 + w)``).
- ``swiglu`` (swiglu.py) / ``geglu`` (geglu.py): gated MLPs get an instance-level ``forward``
  computing down(act(gate(x)) · up(x)) for the family's activation (SiLU, or Gemma's tanh GELU); the
  projections stay modules, so PEFT LoRA and NF4 layers on them keep working.
- ``rope`` (rope.py): attention modules that apply the module-level ``apply_rotary_pos_emb`` run it
  through the kernel (1-D RoPE and the M-RoPE of Qwen2-VL / Qwen3-VL, whose sections are already in
  HF's cos/sin). Attention without rotary (Mllama's cross-attention layers) is reported.
- ``cross_entropy`` (fused_linear_cross_entropy.py): the training loss is the fused linear CE,
  soft-capped at the text config's ``final_logit_softcapping`` where the family's forward applies
  it (``LanguageKernels.logit_softcapping``); ``logits`` is None.
- ``nf4_lora`` (nf4_lora.py): PEFT LoRA layers on NF4 bases get the fused NF4+LoRA forward.
- ``nf4_linear`` (nf4_linear.py; off by default, on for compiled layers, see ``vlm.train.compile``):
  every bitsandbytes NF4 ``Linear4bit`` of the model computes through the ``vlm::nf4_linear`` op.

Every kind that patches nothing says why in ``report.skipped``. ``patch`` is idempotent (a second
call returns the same report); ``unpatch`` undoes everything; ``patch(model, enabled=False)`` (a
config's ``kernels: false``) unpatches and patches nothing. Nothing here edits or rewrites another
library's source text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm.kernels._forwards import hf_model, restore_forward, set_forward
from vlm.kernels._util import interpreting
from vlm.kernels.fused_linear_cross_entropy import logit_softcap, patch_cross_entropy
from vlm.kernels.geglu import patch_geglu_mlps
from vlm.kernels.nf4_linear import detach_nf4_state, patch_nf4_linears
from vlm.kernels.nf4_lora import patch_peft_nf4_loras
from vlm.kernels.rms_norm import TritonRMSNorm, patch_rms_norms, unpatch_rms_norms
from vlm.kernels.rope import patch_rope_attention, unpatch_rope_attention
from vlm.kernels.swiglu import patch_swiglu_mlps

KINDS = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "nf4_lora", "nf4_linear")
_ATTR = "_vlm_kernels_report"
_MLP_KIND = {"silu": "swiglu", "gelu_tanh": "geglu"}

__all__ = ["KINDS", "PatchReport", "TritonRMSNorm", "is_patched", "patch", "unpatch"]


@dataclass
class PatchReport:
    family: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    skipped: dict[str, str] = field(default_factory=dict)   # kind -> why it patched nothing / not all
    notes: list[str] = field(default_factory=list)          # how a kind was adapted to the model
    already_patched: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        s = f"vlm.kernels.patch[{self.family}]: {parts}"
        if self.skipped:
            s += "; skipped: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        if self.notes:
            s += "; " + "; ".join(self.notes)
        return s


def _language_root(hf, family):
    for p in family.component_prefixes.get("language", ()):
        try:
            return hf.get_submodule(p)
        except AttributeError:
            continue
    return None


def patch(model, family=None, *, enabled: bool = True, rms_norm: bool = True, rope: bool = True,
          swiglu: bool = True, cross_entropy: bool = True, nf4_lora: bool = True,
          nf4_linear: bool = False, device=None) -> PatchReport:
    """Patch ``model`` (a transformers VLM or a PeftModel around one) in place; return the report.

    ``family``: the model's ``vlm.families.Family`` (default: ``model.vlm_family``, which
    ``vlm.load`` sets). ``swiglu`` switches the gated-MLP kernel of either activation. ``device``:
    where the model will run, when that is not where its weights are now (FSDP training stages the
    model in host memory and moves each unit to its GPU as it shards it; default: the weights')."""
    hf = hf_model(model)
    if not enabled:
        unpatch(model)
        rep = PatchReport(family=None)
        rep.skipped["all"] = "disabled (kernels: false)"
        return rep
    existing = hf.__dict__.get(_ATTR)
    if existing is not None:
        existing.already_patched = True
        return existing
    family = family if family is not None else getattr(hf, "vlm_family", None)
    if family is None:
        rep = PatchReport()
        rep.skipped["all"] = "no family given (pass family=, or load the model with vlm.load)"
        return rep
    rep = PatchReport(family=family.name)
    dev = torch.device(device) if device is not None else next(hf.parameters()).device
    if dev.type != "cuda" and not interpreting():
        rep.skipped["all"] = f"model on {dev.type}: Triton needs CUDA (or TRITON_INTERPRET=1)"
        return rep
    lang = _language_root(hf, family)
    if lang is None:
        rep.skipped["all"] = f"no language model at {family.component_prefixes.get('language')}"
        return rep
    kernels = family.language_kernels
    off = {k: "turned off by the caller" for k, on in
           (("rms_norm", rms_norm), ("rope", rope), ("cross_entropy", cross_entropy),
            ("nf4_lora", nf4_lora), ("nf4_linear", nf4_linear)) if not on}

    if rms_norm:
        rep.counts["rms_norm"] = patch_rms_norms(lang, kernels)
    mlp_kind = _MLP_KIND[kernels.mlp_activation]
    if swiglu:
        patch_mlps = patch_geglu_mlps if mlp_kind == "geglu" else patch_swiglu_mlps
        rep.counts[mlp_kind], others = patch_mlps(lang, set_forward)
        if others:
            rep.skipped[mlp_kind] = (f"{others} gated MLP(s) whose activation is not the family's "
                                     f"{kernels.mlp_activation}: left as they are")
    else:
        off[mlp_kind] = "turned off by the caller"
    other_mlp = "swiglu" if mlp_kind == "geglu" else "geglu"
    off[other_mlp] = f"the {family.name} MLP activation is {kernels.mlp_activation} ({mlp_kind} applies)"
    if rope:
        rep.counts["rope"], no_rope = patch_rope_attention(lang, set_forward)
        if no_rope:
            rep.skipped["rope"] = (f"{no_rope} attention module(s) apply no rotary embedding "
                                   "(e.g. Mllama cross-attention): left as they are")
    if nf4_lora:
        rep.counts["nf4_lora"] = patch_peft_nf4_loras(lang, set_forward)
    if nf4_linear:   # every NF4 linear of the model, the (frozen) vision tower's included
        rep.counts["nf4_linear"] = patch_nf4_linears(hf, set_forward)
    if cross_entropy:
        cap = logit_softcap(hf.config)
        why = patch_cross_entropy(hf, set_forward, cap if kernels.logit_softcapping else None)
        if why is None:
            rep.counts["cross_entropy"] = 1
            if cap and kernels.logit_softcapping:
                rep.notes.append(f"cross_entropy soft-caps logits at {cap:g} (final_logit_softcapping)")
            elif cap:
                rep.notes.append(f"final_logit_softcapping={cap:g} is in the config but "
                                 f"{type(hf).__name__}'s forward does not apply it: neither does "
                                 "the fused CE")
        if kernels.rms_norm_weight_offset:
            rep.notes.append(f"rms_norm scales by ({kernels.rms_norm_weight_offset:g} + w)")
        else:
            rep.skipped["cross_entropy"] = why
    for kind in KINDS:   # say why every kind that patched nothing did so
        if rep.counts[kind] == 0 and kind not in rep.skipped:
            rep.skipped[kind] = off.get(kind) or _nothing_found(kind)
    hf.__dict__[_ATTR] = rep
    return rep


def _nothing_found(kind: str) -> str:
    return {"rms_norm": "no RMSNorm modules in the language model",
            "rope": "no attention module applies the module-level rotary embedding",
            "swiglu": "no SiLU gated MLPs in the language model",
            "geglu": "no tanh-GELU gated MLPs in the language model",
            "nf4_lora": "no LoRA layers on NF4 bases (not a QLoRA model)",
            "nf4_linear": "no bitsandbytes NF4 linears (16-bit model)"}.get(kind, "nothing to patch")


def unpatch(model) -> PatchReport:
    """Undo ``patch``; returns the report of what had been patched (empty if nothing)."""
    hf = hf_model(model)
    rep = hf.__dict__.pop(_ATTR, None) or PatchReport()
    unpatch_rms_norms(hf)
    hf.__dict__.pop("_vlm_logit_softcap", None)
    for mod in hf.modules():
        kind = mod.__dict__.pop("_vlm_kind", None)
        if kind is None:
            continue
        if kind == "rope":
            unpatch_rope_attention(mod)
        if kind == "nf4_linear":
            detach_nf4_state(mod)
        restore_forward(mod)
    if "_vlm_orig_forward" in hf.__dict__:
        restore_forward(hf)
    return rep


def is_patched(model) -> bool:
    return _ATTR in hf_model(model).__dict__
