"""``vlm.load``: a checkpoint folder or hub id → (model, processor), with its family attached.

16-bit loading goes straight through transformers. Quantization policies plug in at one seam:
``quant=`` (a preset name, dict, YAML path or ``QuantPolicy``) is handed to ``vlm.quant`` which
decides, per full module name, what is stored in 4/8 bit (see issue #4).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm.errors import VlmError
from vlm.families import Family, family_for_config

if TYPE_CHECKING:  # torch is imported lazily: `import vlm` (and the CLI's --help) stays cheap
    import torch

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}


def resolve_dtype(dtype: "str | torch.dtype | None", device: "str | torch.device | None" = None
                  ) -> "torch.dtype":
    """bf16 by default; fp32 on CPU when unspecified is *not* assumed: callers choose."""
    import torch

    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise VlmError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return getattr(torch, _DTYPES[dtype])


def _check_source(path_or_id: str | os.PathLike) -> str:
    s = str(path_or_id)
    p = Path(s).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise VlmError(f"{p} has no config.json: not a Hugging Face checkpoint folder")
        return str(p)
    if s.startswith((".", "/", "~")) or os.sep in s and s.count("/") > 1:
        raise VlmError(f"checkpoint folder {s} does not exist")
    return s  # a hub id: transformers resolves it (honours HF_HUB_OFFLINE)


def load_config(path_or_id: str | os.PathLike):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_check_source(path_or_id))


def load(path_or_id: str | os.PathLike, *, dtype: "str | torch.dtype | None" = None,
         device: "str | torch.device | None" = None, quant: Any = None,
         calibration: Any = None, processor_kwargs: dict | None = None,
         quant_storage: "str | torch.dtype | None" = None) -> tuple[Any, Any]:
    """Load a supported VLM and its processor.

    Args:
        path_or_id: local checkpoint folder (preferred) or a hub id.
        dtype: compute/storage dtype of the 16-bit parts (default bf16).
        device: "cpu", "cuda", "cuda:1"... (default: cuda if available else cpu).
        quant: None / "bf16" for 16-bit; a preset name (``nf4``, ``dynamic``), a dict, a YAML path
            or a ``vlm.quant.QuantPolicy`` for per-component quantization.
        calibration: samples for the sensitivity analysis of ``dynamic`` policies.
        quant_storage: dtype that 4-bit weights are packed into (default uint8); QLoRA under FSDP
            needs the compute dtype here (``vlm.quant.loading.bnb_config``).
    Returns:
        ``(model, processor)``; ``model.vlm_family`` is the ``Family`` record.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = _check_source(path_or_id)
    config = load_config(source)
    family: Family = family_for_config(config)
    torch_dtype = resolve_dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = AutoProcessor.from_pretrained(source, **(processor_kwargs or {}))

    if quant is not None and not (isinstance(quant, str) and quant in ("bf16", "fp16", "none")):
        from vlm.quant.loading import load_quantized

        model = load_quantized(source, config=config, family=family, quant=quant, dtype=torch_dtype,
                               device=device, calibration=calibration, processor=processor,
                               quant_storage=None if quant_storage in (None, "uint8")
                               else resolve_dtype(quant_storage))
    else:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype)
        model.to(device)
        # a checkpoint saved in 4-bit comes back with bitsandbytes layers: same CPU path as above
        from vlm.quant.cpu_path import use_portable_cpu_path
        use_portable_cpu_path(model)
    model.vlm_family = family
    return model, processor
