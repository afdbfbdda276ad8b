"""What FSDP2 holds where: each process's parameter bytes, the units, and the root unit's share.

FSDP2 all-gathers a unit's parameters before the unit runs and frees them after
(``reshard_after_forward``); the *root* unit (the whole model) keeps its own parameters gathered
from the start of forward to the end of backward, so whatever is in no smaller unit stays whole on
every GPU for the entire step.

How the model is cut (accelerate 1.15 + transformers 5.17–5.19, measured on the tiny Qwen2-VL by
tests/vlm/train/test_fsdp_units.py): one unit per ``_no_split_modules`` class (decoder layers,
vision blocks; for a PEFT model too: Trainer swaps in PEFT's FSDP1 wrap policy only on the path
that delays optimizer creation, which FSDP2 does not take), one for the input embeddings, one for
lm_head (accelerate's "tail", kept gathered from forward to backward), and the root. The root keeps
the vision patch embedding, the merger and the final norm: at Qwen2-VL-7B's shapes ~46 M of
8.3 B parameters (0.6 %), so no unit of their own (one more all-gather per step for ~92 MB).
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
