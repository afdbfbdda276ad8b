"""``vlm.kernels.patch(model)``: route a supported VLM's language side through our Triton kernels.

What is swapped, and how (never by editing or rewriting another library's source text):

- ``rms_norm``: every ``*RMSNorm`` module under the language model is replaced by ``TritonRMSNorm``
  holding the *same* weight Parameter (state-dict keys and optimizer references are unchanged).
- ``swiglu``: every gated MLP (gate_proj / up_proj / down_proj with SiLU) under the language model gets
  an instance-level ``forward`` computing down(swiglu(gate(x), up(x))); the projections stay modules,
  so PEFT LoRA and NF4 layers on them keep working.
- ``rope``: each language attention module whose modeling file applies ``apply_rotary_pos_emb`` gets a
  forward wrapper that marks "inside a patched attention" (thread-local), and that module-level
  function name is pointed at a dispatcher which runs our RoPE kernel only under that mark and the
  original function otherwise (unpatched models in the same process are untouched). Qwen2-VL's
  M-RoPE sections are already folded into HF's cos/sin, so the same kernel applies. Attention without
  rotary (Mllama's cross-attention layers) is reported as skipped.
- ``cross_entropy``: the top-level ``*ForConditionalGeneration`` forward is wrapped: in training with
  ``labels``, lm_head passes hidden states through, and the loss is the fused linear CE over shifted
  labels (HF's causal-LM loss: ignore_index -100, ``num_items_in_batch`` honoured); ``logits`` is None.
  Evaluation (``model.eval()``) or no labels: the original forward, logits included.
- ``nf4_lora``: PEFT ``lora.bnb.Linear4bit`` layers on an NF4 base get the fused NF4+LoRA forward
  (falls back to PEFT's own per call when adapters are disabled/merged, several are active, or DoRA).
- ``nf4_linear`` (off by default; on for compiled layers, see ``vlm.train.compile``): bitsandbytes
  NF4 ``Linear4bit`` modules of the whole model (the language model's, PEFT's base layers included,
  and the frozen vision tower's) compute through the ``vlm::nf4_linear`` custom op, whose backward
  re-dequantizes instead of saving deq(W); compiled vision blocks then share one graph too.

``patch`` is idempotent (a second call changes nothing and returns the same report); ``unpatch`` undoes
everything; ``patch(model, enabled=False)`` (a config's ``kernels: false``) unpatches and patches nothing.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from types import MethodType

import torch

from vlm.kernels._util import interpreting
from vlm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from vlm.kernels.nf4_linear import attach_nf4_state, bnb_linear4bit_forward, detach_nf4_state
from vlm.kernels.nf4_lora import peft_nf4_lora_forward
from vlm.kernels.rms_norm import TritonRMSNorm
from vlm.kernels.rope import rope
from vlm.kernels.swiglu import swiglu_mlp_forward

KINDS = ("rms_norm", "rope", "swiglu", "cross_entropy", "nf4_lora", "nf4_linear")
_ATTR = "_vlm_kernels_report"


@dataclass
class PatchReport:
    family: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    skipped: dict[str, str] = field(default_factory=dict)   # kind or module -> why
    already_patched: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        s = f"vlm.kernels.patch[{self.family}]: {parts}"
        if self.skipped:
            s += "; skipped: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return s


# --------------------------------------------------------------------------- helpers

def _hf_model(model):
    """The transformers model under a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        try:
            return model.get_base_model()
        except Exception:  # noqa: BLE001 - not a PEFT wrapper after all
            pass
    return model


def _set_forward(mod, fn):
    """Install an instance-level forward, remembering what was there (class method or a hook's)."""
    mod._vlm_prev_forward = mod.__dict__.get("forward", None)
    mod._vlm_orig_forward = mod.forward
    mod.forward = fn


def _restore_forward(mod):
    prev = mod.__dict__.pop("_vlm_prev_forward", None)
    mod.__dict__.pop("_vlm_orig_forward", None)
    if prev is None:
        mod.__dict__.pop("forward", None)
    else:
        mod.forward = prev


def _language_root(hf, family):
    prefixes = family.component_prefixes.get("language", ()) if family else ()
    for p in prefixes:
        try:
            return p, hf.get_submodule(p)
        except AttributeError:
            continue
    return None, None


# --------------------------------------------------------------------------- rope dispatch

_tls = threading.local()
_ROPE_INSTALLED: dict[str, tuple[object, int]] = {}   # module name -> (original fn, users)


def _rope_active() -> bool:
    return getattr(_tls, "depth", 0) > 0


def _make_rope_dispatcher(orig):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsq = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if (_rope_active() and unsq == 1 and q.dim() == 4 and cos.dim() == 3
                and q.shape[-1] == cos.shape[-1] and q.shape[2] == cos.shape[1]
                and (q.is_cuda or interpreting())):
            return rope(q, k, cos, sin)
        return orig(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._vlm_dispatcher = True
    return apply_rotary_pos_emb


def _install_rope(modname: str) -> bool:
    mod = sys.modules.get(modname)
    fn = getattr(mod, "apply_rotary_pos_emb", None) if mod else None
    if fn is None:
        return False
    if modname in _ROPE_INSTALLED:
        orig, users = _ROPE_INSTALLED[modname]
        _ROPE_INSTALLED[modname] = (orig, users + 1)
        return True
    if getattr(fn, "_vlm_dispatcher", False):   # installed by an earlier import of this file
        return True
    _ROPE_INSTALLED[modname] = (fn, 1)
    setattr(mod, "apply_rotary_pos_emb", _make_rope_dispatcher(fn))
    return True


def _uninstall_rope(modname: str) -> None:
    if modname not in _ROPE_INSTALLED:
        return
    orig, users = _ROPE_INSTALLED[modname]
    if users <= 1:
        setattr(sys.modules[modname], "apply_rotary_pos_emb", orig)
        del _ROPE_INSTALLED[modname]
    else:
        _ROPE_INSTALLED[modname] = (orig, users - 1)


def _rope_attention_forward(attn, *args, **kwargs):
    _tls.depth = getattr(_tls, "depth", 0) + 1
    try:
        return attn._vlm_orig_forward(*args, **kwargs)
    finally:
        _tls.depth -= 1


def _uses_module_rope(attn) -> bool:
    """True if the attention's class forward refers to the module-level apply_rotary_pos_emb."""
    fwd = type(attn).forward
    code = getattr(fwd, "__code__", None)
    return code is not None and "apply_rotary_pos_emb" in code.co_names


# --------------------------------------------------------------------------- fused CE

def _lm_head_forward(head, x):
    if getattr(head, "_vlm_passthrough", False):
        return x
    return head._vlm_orig_forward(x)


def _ce_forward(hf, *args, **kwargs):
    labels = kwargs.get("labels")
    if labels is None or not hf.training:
        return hf._vlm_orig_forward(*args, **kwargs)
    head = hf.get_output_embeddings()
    kw = dict(kwargs, labels=None)
    head._vlm_passthrough = True
    try:
        out = hf._vlm_orig_forward(*args, **kw)
    finally:
        head._vlm_passthrough = False
    hidden = out.logits
    if hidden.shape[1] != labels.shape[1]:
        raise ValueError("fused CE: logits_to_keep / sliced hidden states do not match labels; "
                         "call with logits_to_keep=0 in training")
    hidden = hidden.to(head.weight.dtype)
    shift = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100).to(hidden.device)
    num_items = kwargs.get("num_items_in_batch")
    loss = fused_linear_cross_entropy(hidden, head.weight, shift, bias=head.bias, ignore_index=-100,
                                      num_items=num_items)
    out.loss = loss
    out.logits = None
    return out


# --------------------------------------------------------------------------- patch / unpatch

def _is_rmsnorm(mod) -> bool:
    name = type(mod).__name__
    return (name.endswith("RMSNorm") and not isinstance(mod, TritonRMSNorm)
            and isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 1
            and "Gemma" not in name)


def _is_swiglu_mlp(mod) -> bool:
    if not all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(mod, "act_fn", None)
    return type(act).__name__ in ("SiLU", "SiLUActivation") or act is torch.nn.functional.silu


def _is_bnb_nf4(mod) -> bool:
    qs = getattr(getattr(mod, "weight", None), "quant_state", None)
    return (type(mod).__name__ == "Linear4bit" and type(mod).__module__.startswith("bitsandbytes")
            and qs is not None and qs.quant_type == "nf4")


def _is_peft_nf4_lora(mod) -> bool:
    if not (hasattr(mod, "lora_A") and hasattr(mod, "get_base_layer")):
        return False
    base = mod.get_base_layer()
    qs = getattr(getattr(base, "weight", None), "quant_state", None)
    return type(base).__name__ == "Linear4bit" and qs is not None and qs.quant_type == "nf4"


def patch(model, *, enabled: bool = True, rms_norm: bool = True, rope: bool = True,
          swiglu: bool = True, cross_entropy: bool = True, nf4_lora: bool = True,
          nf4_linear: bool = False) -> PatchReport:
    """Patch ``model`` (a transformers VLM or a PeftModel around one) in place; return the report."""
    hf = _hf_model(model)
    if not enabled:
        unpatch(model)
        rep = PatchReport(family=None)
        rep.skipped["all"] = "disabled (kernels: false)"
        return rep
    existing = hf.__dict__.get(_ATTR)
    if existing is not None:
        existing.already_patched = True
        return existing
    from vlm.families import family_for_config

    try:
        family = family_for_config(hf.config)
    except Exception as e:  # noqa: BLE001
        rep = PatchReport()
        rep.skipped["all"] = f"unsupported model: {e}"
        return rep
    rep = PatchReport(family=family.name)
    dev = next(hf.parameters()).device
    if dev.type != "cuda" and not interpreting():
        rep.skipped["all"] = f"model on {dev.type}: Triton needs CUDA (or TRITON_INTERPRET=1)"
        return rep
    lang_prefix, lang = _language_root(hf, family)
    if lang is None:
        rep.skipped["all"] = f"no language model at {family.component_prefixes.get('language')}"
        return rep

    # collect first, then mutate (replacing children while iterating named_modules is unsafe)
    mods = list(lang.named_modules())
    if rms_norm:
        for name, mod in mods:
            if _is_rmsnorm(mod):
                parent_name, _, child = name.rpartition(".")
                parent = lang.get_submodule(parent_name) if parent_name else lang
                setattr(parent, child, TritonRMSNorm.from_module(mod))
                rep.counts["rms_norm"] += 1
    if swiglu:
        for name, mod in mods:
            if _is_swiglu_mlp(mod):
                _set_forward(mod, MethodType(swiglu_mlp_forward, mod))
                mod._vlm_kind = "swiglu"
                rep.counts["swiglu"] += 1
    if rope:
        no_rope = 0
        for name, mod in mods:
            if not (name.endswith("attn") or "Attention" in type(mod).__name__):
                continue
            if not hasattr(mod, "q_proj") or getattr(mod, "_vlm_kind", None):
                continue
            if _uses_module_rope(mod) and _install_rope(type(mod).__module__):
                _set_forward(mod, MethodType(_rope_attention_forward, mod))
                mod._vlm_kind = "rope"
                mod._vlm_rope_module = type(mod).__module__
                rep.counts["rope"] += 1
            else:
                no_rope += 1
        if no_rope:
            rep.skipped["rope"] = (f"{no_rope} attention module(s) apply no rotary embedding "
                                   "(e.g. Mllama cross-attention): left as they are")
    if nf4_lora:
        for name, mod in mods:
            if _is_peft_nf4_lora(mod) and not getattr(mod, "_vlm_kind", None):
                _set_forward(mod, MethodType(peft_nf4_lora_forward, mod))
                mod._vlm_kind = "nf4_lora"
                rep.counts["nf4_lora"] += 1
    if nf4_linear:   # every NF4 linear of the model, the (frozen) vision tower's included
        for name, mod in list(hf.named_modules()):
            if _is_bnb_nf4(mod) and not getattr(mod, "_vlm_kind", None):
                attach_nf4_state(mod)
                _set_forward(mod, MethodType(bnb_linear4bit_forward, mod))
                mod._vlm_kind = "nf4_linear"
                rep.counts["nf4_linear"] += 1
    if cross_entropy:
        head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        if head is None or type(head) is not torch.nn.Linear:
            rep.skipped["cross_entropy"] = (f"lm_head is {type(head).__name__}, not a plain Linear "
                                            "(quantized or adapted lm_head): HF loss kept")
        else:
            _set_forward(head, MethodType(_lm_head_forward, head))
            head._vlm_kind = "lm_head"
            _set_forward(hf, MethodType(_ce_forward, hf))
            rep.counts["cross_entropy"] += 1
    hf.__dict__[_ATTR] = rep
    return rep


def unpatch(model) -> PatchReport:
    """Undo ``patch``; returns the report of what had been patched (empty if nothing)."""
    hf = _hf_model(model)
    rep = hf.__dict__.pop(_ATTR, None) or PatchReport()
    for name, mod in list(hf.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, TritonRMSNorm) and hasattr(child, "_replaced"):
                setattr(mod, child_name, child._replaced)
    for mod in hf.modules():
        kind = mod.__dict__.pop("_vlm_kind", None)
        if kind is None:
            continue
        if kind == "rope":
            _uninstall_rope(mod.__dict__.pop("_vlm_rope_module"))
        if kind == "nf4_linear":
            detach_nf4_state(mod)
        _restore_forward(mod)
    if "_vlm_orig_forward" in hf.__dict__:
        _restore_forward(hf)
    return rep


def is_patched(model) -> bool:
    return _ATTR in _hf_model(model).__dict__
