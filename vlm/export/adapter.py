"""Read a PEFT LoRA adapter folder without loading any model: config, tensor names, base, metadata.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
``adapter_model.bin``). Tensor names look like
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (LoRA on a linear),
``base_model.model.<module>.lora_embedding_A`` (LoRA on an embedding),
``base_model.model.<module>.lora_magnitude_vector`` (DoRA) and
``base_model.model.<module>.weight`` (a full copy: ``modules_to_save``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.errors import VlmError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                   r"lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)*$")


class AdapterError(VlmError):
    """An adapter folder is missing, incomplete or unreadable."""


@dataclass
class AdapterInfo:
    """What an adapter folder says about itself (no tensors loaded)."""

    path: Path
    config: dict[str, Any]
    tensor_names: list[str]
    lora_modules: dict[str, set[str]] = field(default_factory=dict)   # module -> {lora_A, lora_B, ...}
    full_modules: list[str] = field(default_factory=list)             # modules saved whole

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    def ranks(self) -> list[int]:
        """Every rank used (``r`` plus any ``rank_pattern`` values)."""
        return sorted({self.r, *(int(v) for v in (self.config.get("rank_pattern") or {}).values())})


def _tensor_names(folder: Path) -> list[str]:
    st = folder / WEIGHTS[0]
    if st.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(st), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # noqa: BLE001 - a truncated/corrupt file: say which
            raise AdapterError(f"{st} is not a readable safetensors file ({e}); re-save the adapter") from None
    import torch

    return list(torch.load(folder / WEIGHTS[1], map_location="meta", weights_only=True).keys())


def read_adapter(path: str | Path) -> AdapterInfo:
    """Parse an adapter folder; clear errors for a missing folder, config or weights file."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise AdapterError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise AdapterError(f"adapter path {folder} is not a folder (give the folder that holds {CONFIG})")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file() and (folder / "projector.safetensors").is_file():   # vlm.train.modes output
        raise AdapterError(f"{folder} holds a projector-only file (method: projector, LLaVA stage 1), not "
                           "a PEFT adapter: start stage 2 from it (model.projector_init: "
                           f"{folder}) and export that run, or load it into the base in transformers with "
                           "model.load_state_dict(safetensors.torch.load_file(...), strict=False)")
    if not cfg_path.is_file() and (folder / "config.json").is_file():
        raise AdapterError(f"{folder} holds a whole model (config.json; method: full writes one), not a "
                           "PEFT adapter: it loads, serves and converts as it is (no merge needed)")
    if not cfg_path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG}: not a PEFT adapter folder (a training run's adapter "
                           "is in its output folder or a checkpoint-N/ inside it)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path} is not valid JSON: {e}") from None
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise AdapterError(f"{folder} has {CONFIG} but no {' or '.join(WEIGHTS)}")
    names = _tensor_names(folder)
    info = AdapterInfo(path=folder, config=config, tensor_names=names)
    for name in names:
        short = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        m = _LORA.match(short)
        if m:
            info.lora_modules.setdefault(m["module"], set()).add(m["kind"])
        else:
            info.full_modules.append(short.rsplit(".", 1)[0])
    info.full_modules = sorted(set(info.full_modules))
    return info
