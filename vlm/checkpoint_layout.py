"""Write checkpoints in the hub's tensor names, the ones vLLM and transformers 4 load.

transformers 5 writes some towers under names of its own (Gemma 3's SigLIP and LLaVA's CLIP as
``vision_tower.embeddings/encoder.*`` where the hub's checkpoints have
``vision_tower.vision_model.*``); vLLM refuses those ("no module or parameter named
vision_tower.embeddings") while transformers 5 loads either. The family record says how its names
differ (``Family.hub_layout``); this module applies that to a saved folder.

Only the safetensors header changes: a file is a little-endian u64 header length, a JSON header
(name -> dtype, shape, byte offsets into the data buffer, plus ``__metadata__``), then the data
buffer. Offsets are relative to the buffer, so renaming rewrites the header and copies the buffer
byte for byte: no tensor is decoded, and the weights are bit-identical. A file whose names the rules
leave alone is not touched at all (families without rules keep transformers' files as written).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

from vlm.errors import VlmError

INDEX = "model.safetensors.index.json"
_COPY_CHUNK = 64 << 20   # 64 MiB: a weight buffer is copied in chunks, never held whole


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data buffer) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise VlmError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n > size - 8:
            raise VlmError(f"{path}: not a safetensors file (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise VlmError(f"{path}: unreadable safetensors header ({e})") from None
    return header, 8 + n


def rename_safetensors(path: str | Path, rename: Callable[[str], str]) -> int:
    """Rename the tensors of one safetensors file in place (atomically); return how many changed."""
    path = Path(path)
    header, data_start = read_header(path)
    new_header, changed = {}, 0
    for key, entry in header.items():
        new = key if key == "__metadata__" else rename(key)
        if new in new_header:
            raise VlmError(f"{path}: renaming {key!r} to {new!r} collides with another tensor of that name")
        changed += new != key
        new_header[new] = entry
    if not changed:
        return 0
    text = json.dumps(new_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # pad as safetensors does: the buffer starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.renaming")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(text)))
            dst.write(text)
            src.seek(data_start)
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return changed


def to_hub_layout(folder: str | Path, family: Any) -> int:
    """Rename every weight file of the checkpoint in ``folder`` to ``family``'s hub layout (and the
    shard index, if any); return how many tensor names changed (0: the folder is untouched)."""
    folder = Path(folder)
    if not family.hub_layout:
        return 0
    changed = sum(rename_safetensors(f, family.hub_key) for f in sorted(folder.glob("*.safetensors")))
    index = folder / INDEX
    if changed and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {family.hub_key(k): v for k, v in data.get("weight_map", {}).items()}
        tmp = index.with_name(f".{index.name}.renaming")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, index)
    return changed


def save_model(model: Any, folder: str | Path, family: Any = None, **save_kwargs) -> Path:
    """``model.save_pretrained(folder)``, then the family's hub layout (the family from the model's
    config when not given). For a folder the caller writes atomically (``replacing_folder``)."""
    if family is None:
        from vlm.families import family_for_config

        family = getattr(model, "vlm_family", None) or family_for_config(model.config)
    model.save_pretrained(folder, **save_kwargs)
    to_hub_layout(folder, family)
    return Path(folder)


__all__ = ["read_header", "rename_safetensors", "save_model", "to_hub_layout"]
