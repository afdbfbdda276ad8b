"""``--merged OUT``: fold a LoRA adapter into its 16-bit base and write a plain checkpoint.

Steps: load the base in 16 bit (if it is stored in 4/8 bit — a pre-quantized checkpoint, or the
adapter's metadata says training quantized it — dequantize every bitsandbytes layer first, so the
merged weights are exactly the weights the adapter was trained against: W = dequant(Q) + s·B·A);
apply the adapter with PEFT; ``merge_and_unload``; save safetensors under the hub's tensor names
(``vlm.checkpoint_layout``: vLLM loads no other) with the model's class as ``architectures`` (what
vLLM dispatches on); copy every processor, tokenizer and chat-template file
verbatim; record our metadata (pixel limits, policy, provenance) under ``config.json["vlmtune"]``.

Atomic: everything is written to a hidden temp folder beside OUT, fsynced, then renamed to OUT; a
crash leaves OUT untouched (or absent), never half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from vlm.atomic import replacing_folder
from vlm.checkpoint_layout import save_model
from vlm.errors import VlmError
from vlm.export.adapter import read_adapter
from vlm.export.metadata import CONFIG_KEY, policy_from_record, read_metadata

# Files a processor/tokenizer may consist of (copied verbatim from the adapter folder when it has
# its own processor files — the training recipe saves them there — else from the base).
PROCESSOR_GLOBS = ("tokenizer*.json", "tokenizer.model", "*.tiktoken", "vocab.json", "vocab.txt",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja", "additional_chat_templates/*", "preprocessor_config.json",
                   "processor_config.json", "video_preprocessor_config.json", "spiece.model")


class ExportError(VlmError):
    """The merged export could not be written."""


def _processor_files(folder: Path) -> list[Path]:
    files: set[Path] = set()
    for g in PROCESSOR_GLOBS:
        files.update(p for p in folder.glob(g) if p.is_file())
    return sorted(files)


def dequantize_bnb(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes 4/8-bit linear and every vlm ``Int8Linear`` (int8w) in ``model`` by
    an ``nn.Linear`` in ``dtype`` holding its dequantized weight.

    Returns how many layers were replaced. ``peft``'s own merge into a 4-bit layer would re-quantize
    the merged weight (losing the adapter's fine detail), hence dequantize *before* merging.
    """
    from vlm.quant.int8_linear import dequantize_int8w

    n_int8w = dequantize_int8w(model, dtype)   # vlm's own int8 tier: W = q · s (vlm.quant.int8_linear)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        return n_int8w
    swaps = []
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            cb, scb = mod.weight.data, getattr(mod.weight, "SCB", None)
            if scb is None:  # not quantized yet (still a float weight)
                w = cb
            else:
                w = cb.float() * scb.float().unsqueeze(1) / 127.0
        else:
            continue
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w.reshape(mod.out_features, mod.in_features).to(dtype))
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.data.to(dtype))
        swaps.append((name, lin))
    for name, lin in swaps:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    if swaps:
        model.config.quantization_config = None
        for attr in ("quantization_config", "is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if hasattr(model, attr):
                try:
                    delattr(model, attr)
                except AttributeError:
                    setattr(model, attr, False if attr != "quantization_config" else None)
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        # transformers replays the load-time weight conversions in reverse on save; the bnb ones
        # (re-serializing quant states) no longer apply to plain Linear weights.
        conv = getattr(model, "_weight_conversions", None)
        if conv:
            model._weight_conversions = [c for c in conv if not any(
                "bitsandbytes" in type(op).__module__ or "bnb" in type(op).__name__.lower()
                for op in (getattr(c, "operations", None) or []))] or None
    return len(swaps) + n_int8w


def load_merged(adapter: str | Path, *, base: str | None = None, dtype: str | torch.dtype | None = None,
                quant: Any = "auto") -> tuple[torch.nn.Module, Any, dict]:
    """Base (dequantized to ``dtype``) + adapter, merged in memory → (model, processor, info)."""
    from peft import PeftModel

    from vlm.load import load, load_config, resolve_dtype

    info = read_adapter(adapter)
    meta = read_metadata(info.path)
    base = base or meta.get("base_model") or info.base_model
    if not base:
        raise ExportError(f"{info.path}: no base model recorded; pass --base BASE_CHECKPOINT")
    config = load_config(base)
    if dtype is None:
        dtype = meta.get("dtype") or str(getattr(config, "dtype", None) or "bfloat16").replace("torch.", "")
    torch_dtype = resolve_dtype(dtype)
    quant = policy_from_record(meta.get("quant")) if quant == "auto" else quant
    model, processor = load(base, dtype=torch_dtype, device="cpu", quant=quant)
    n = dequantize_bnb(model, torch_dtype)
    peft_model = PeftModel.from_pretrained(model, str(info.path), is_trainable=False)
    merged = peft_model.merge_and_unload(progressbar=False, safe_merge=True)
    merged.vlm_family = model.vlm_family
    details = {"base": str(base), "dtype": str(torch_dtype).replace("torch.", ""), "dequantized_layers": n,
               "quant": quant, "meta": meta, "adapter": str(info.path)}
    return merged, processor, details


def export_merged(adapter: str | Path, out: str | Path, *, base: str | None = None,
                  dtype: str | torch.dtype | None = None, quant: Any = "auto",
                  overwrite: bool = False) -> Path:
    """Write base+adapter merged to ``out`` atomically; return ``out``.

    ``quant="auto"`` takes the base's quantization policy from the adapter's metadata (what training
    used), ``None`` loads the 16-bit base as stored.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists: choose another folder or pass --overwrite")
    model, _processor, d = load_merged(adapter, base=base, dtype=dtype, quant=quant)
    family = model.vlm_family
    src_proc = Path(d["adapter"]) if _processor_files(Path(d["adapter"])) else Path(d["base"])
    with replacing_folder(out) as tmp:
        save_model(model, tmp, family)   # the hub's tensor names (Family.hub_layout): what vLLM loads
        for f in _processor_files(src_proc):
            dest = tmp / f.relative_to(src_proc)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        if not _processor_files(tmp):
            raise ExportError(f"no processor/tokenizer files found in {src_proc}: the merged model could not "
                              "be served; the base checkpoint must hold its processor files")
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        # the merged model's own transformers class: the name vLLM dispatches on (one family record
        # covers Qwen2-VL and Qwen2.5-VL, whose classes differ)
        cfg["architectures"] = [type(model).__name__]
        cfg.pop("quantization_config", None)
        meta = dict(d["meta"])
        meta.update(merged_from=d["adapter"], base_model=d["base"], dtype=d["dtype"], family=family.name)
        if d["quant"] is not None:
            meta["trained_on_quant"] = d["quant"]
        meta.pop("quant", None)  # the merged weights are 16-bit: no quantization plan applies
        meta.pop("lora", None)
        cfg[CONFIG_KEY] = {**(cfg.get(CONFIG_KEY) or {}), **meta}
        cfg[CONFIG_KEY].pop("quant", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
