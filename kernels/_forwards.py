"""Instance-level forward swaps shared by every op's dispatch (``vlm.kernels.patch``).

A patched module gets its own ``forward`` attribute; what was there before (the class method, or an
instance forward a hook library installed) is remembered and put back by ``restore_forward``. The
module's ``_vlm_kind`` names the op that patched it, so ``unpatch`` knows what to undo."""

from __future__ import annotations


def hf_model(model):
    """The transformers model under a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        try:
            return model.get_base_model()
        except Exception:  # noqa: BLE001 - not a PEFT wrapper after all
            pass
    return model


def set_forward(mod, fn):
    """Install an instance-level forward, remembering what was there (class method or a hook's)."""
    mod._vlm_prev_forward = mod.__dict__.get("forward", None)
    mod._vlm_orig_forward = mod.forward
    mod.forward = fn


def restore_forward(mod):
    prev = mod.__dict__.pop("_vlm_prev_forward", None)
    mod.__dict__.pop("_vlm_orig_forward", None)
    if prev is None:
        mod.__dict__.pop("forward", None)
    else:
        mod.forward = prev
