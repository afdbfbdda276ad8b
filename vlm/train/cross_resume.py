"""Resume a checkpoint written under another strategy: FSDP2 (N processes) ⇄ one process / DDP.

The two layouts transformers' Trainer writes:

- FSDP2 (``state_dict_type: SHARDED_STATE_DICT``): ``pytorch_model_fsdp_0/`` and ``optimizer_0/``,
  torch.distributed.checkpoint (DCP) folders. The model folder holds the adapter under PEFT's key
  names (``model.<peft key>``); the optimizer folder holds ``torch.distributed.checkpoint.state_dict``'s
  form: state per parameter *name* (``optimizer.state.<name>.<key>``) with whole tensors (DCP stitches
  the shards), and ``param_groups`` listing names. With bitsandbytes' 8-bit optimizers the states are
  the dense fp32 moments ``exp_avg`` / ``exp_avg_sq`` (``vlm.train.sharded_optim``).
- one process / DDP: ``adapter_model.safetensors`` (PEFT keys) and ``optimizer.pt``: the optimizer's
  own ``state_dict()``, keyed by position; bitsandbytes' 8-bit moments as uint8 blocks + absmax.

Trainer reads each layout only under the strategy that wrote it. Here both become one portable
form, *whole tensors keyed by name* (adapter: PEFT key → tensor; optimizer: parameter name →
state), and go into the running model and optimizer: under FSDP2 each whole tensor is cut to this
process's shard (``distribute_tensor`` with ``src_data_rank=None``: every process read the same
file, so each slices its own rows, no communication); otherwise it is loaded as it is.
bitsandbytes' 8-bit states are dequantized to dense moments on the way and re-quantized into the
new shard's blocks by ``ShardLocalMixin.load_state_dict`` (within the 8-bit state's resolution).

``method: full`` / ``projector`` (BF16AdamW): the optimizer goes through the same path (BF16AdamW's
8-bit codes are decoded by ``vlm.train.bf16_adamw.dense_entry`` and re-encoded into the new shard's
blocks by its ``load_state_dict``); the weights are put in by the recipe before sharding
(``vlm.train.modes.resume_weights``: the whole model from ``pytorch_model_fsdp_0`` via ``read_dcp``
or from safetensors; a projector checkpoint's ``projector.safetensors`` under every strategy).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vlm.errors import VlmError

FSDP_MODEL = "pytorch_model_fsdp_0"     # accelerate's names (FSDP_MODEL_NAME, OPTIMIZER_NAME) + index 0
FSDP_OPTIMIZER = "optimizer_0"
ADAPTER = "adapter_model.safetensors"
OPTIMIZER = "optimizer.pt"


def written_by_fsdp(checkpoint: str | os.PathLike) -> bool:
    """FSDP checkpoints hold sharded model/optimizer folders (accelerate's ``*_fsdp_*`` / ``optimizer_*``)."""
    return any(c.is_dir() and (c.name.startswith("pytorch_model_fsdp") or c.name.startswith("optimizer_"))
               for c in Path(checkpoint).iterdir())


def crosses(checkpoint: str | os.PathLike, fsdp_now: bool) -> bool:
    """True when ``checkpoint`` was written under FSDP and this run is not, or the other way round."""
    return written_by_fsdp(checkpoint) != bool(fsdp_now)


def check_readable(checkpoint: Path, method: str = "lora") -> None:
    """The files a cross-strategy resume reads, or a VlmError naming what is missing. ``method``:
    ``lora`` (the adapter), ``full`` (the whole model: DCP folder or safetensors) or ``projector``
    (its checkpoints hold ``projector.safetensors`` under every strategy)."""
    fsdp = written_by_fsdp(checkpoint)
    if method == "projector":
        need = ["projector.safetensors", FSDP_OPTIMIZER if fsdp else OPTIMIZER]
    elif method == "full" and not fsdp:
        weights = [n for n in ("model.safetensors", "model.safetensors.index.json") if (checkpoint / n).is_file()]
        need = [weights[0] if weights else "model.safetensors", OPTIMIZER]
    elif fsdp:
        need = [FSDP_MODEL, FSDP_OPTIMIZER]
        if (checkpoint / "pytorch_model_fsdp.bin").is_file():
            raise VlmError(f"{checkpoint} was written under FSDP with distributed.fsdp_state_dict: full; "
                           "only sharded (DCP) FSDP checkpoints resume on another strategy: resume it "
                           "with distributed.strategy=fsdp")
    else:
        need = [ADAPTER, OPTIMIZER]
    missing = [n for n in need if not (checkpoint / n).exists()]
    if missing:
        raise VlmError(f"{checkpoint}: cannot resume it on another strategy: {', '.join(missing)} missing")


# -- reading: whole tensors keyed by name --------------------------------------------------------
def read_dcp(folder: Path, prefix: str) -> dict:
    """Every entry of a DCP folder under ``prefix`` (``model`` / ``optimizer``), whole, on CPU.

    Reads without a process group (``no_dist``): each process reads the files on its own."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    meta = reader.read_metadata()
    flat: dict = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith(prefix + "."):
            flat[key] = (torch.empty(md.size, dtype=md.properties.dtype)
                         if isinstance(md, TensorStorageMetadata) else None)
    # flat keys in, values loaded in place (tensors) or set (bytes: both flattenings off keep the
    # dict the planner writes into ours); planner_data (the original nesting) unflattens below
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    dcp.load(flat, storage_reader=reader, planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
             no_dist=True)
    nested: dict = {}
    for key, value in flat.items():
        path = meta.planner_data[key] if meta.planner_data and key in meta.planner_data else tuple(key.split("."))
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested[prefix]


def read_adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    """PEFT key → whole tensor, from either layout."""
    if written_by_fsdp(checkpoint):
        return read_dcp(checkpoint / FSDP_MODEL, "model")
    from safetensors.torch import load_file

    return load_file(str(checkpoint / ADAPTER), device="cpu")


def read_optimizer(checkpoint: Path, optimizer, model) -> dict:
    """``{"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}`` with whole tensors."""
    if written_by_fsdp(checkpoint):
        sd = read_dcp(checkpoint / FSDP_OPTIMIZER, "optimizer")
        groups = sd["param_groups"]
        groups = [groups[k] for k in sorted(groups, key=int)] if isinstance(groups, dict) else list(groups)
        return {"state": sd.get("state", {}), "param_groups": groups}
    sd = torch.load(checkpoint / OPTIMIZER, map_location="cpu", weights_only=True)
    # optimizer.pt keys its states by position in the optimizer's parameter order; the same model
    # and recipe build the same order, so position i of the saved groups is position i here
    names = _names_in_order(optimizer, model)
    saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(names):
        raise VlmError(f"{checkpoint / OPTIMIZER}: {len(saved_ids)} parameters in the optimizer state, "
                       f"this model trains {len(names)}: not the same adapter (LoRA r/targets?)")
    by_id = dict(zip(saved_ids, names))
    state = {by_id[i]: _dense_entry(s) for i, s in sd["state"].items() if i in by_id}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _dense_entry(entry: dict) -> dict:
    """A bitsandbytes state entry (uint8 blocks + absmax, or 32-bit state1/state2) as dense moments;
    torch optimizers' entries unchanged."""
    entry = dict(entry)
    wrapped = entry.pop("__bnb_optimizer_quant_state__", None)   # bitsandbytes' FSDP wrapping
    if isinstance(wrapped, dict):
        entry.update(wrapped)
    if "state1" not in entry:
        from vlm.train.bf16_adamw import dense_entry

        return dense_entry(entry)     # BF16AdamW's 8-bit codes as dense moments; others unchanged
    from vlm.train.sharded_optim import _dense_moments

    m, v = _dense_moments(entry)
    return {"step": torch.tensor(float(entry["step"])), "exp_avg": m, "exp_avg_sq": v}


def _names_in_order(optimizer, model) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


# -- loading into the running model / optimizer --------------------------------------------------
def _like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (whole) placed like ``ref``: this process's shard when ``ref`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(ref, DTensor):
        full = value.to(device=ref.device, dtype=value.dtype)
        return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)
    return value.to(ref.device)


def load_adapter(model, checkpoint: Path) -> int:
    """Load the checkpoint's adapter weights into ``model`` (a PeftModel, sharded or not); returns
    how many tensors were loaded."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = read_adapter(checkpoint)
    adapter = model.active_adapter
    ref = get_peft_model_state_dict(model, adapter_name=adapter)
    missing = sorted(set(ref) - set(saved))
    if missing:
        raise VlmError(f"{checkpoint}: the adapter there lacks {len(missing)} of this run's weights "
                       f"(e.g. {missing[0]}): not the same LoRA setup")
    for k, v in ref.items():
        if tuple(saved[k].shape) != tuple(v.shape):
            raise VlmError(f"{checkpoint}: {k} is {tuple(saved[k].shape)} there, {tuple(v.shape)} here")
    placed = {k: _like(saved[k].to(v.dtype), v) for k, v in ref.items()}
    set_peft_model_state_dict(model, placed, adapter_name=adapter)
    return len(placed)


def load_optimizer(model, optimizer, checkpoint: Path) -> int:
    """Load the checkpoint's optimizer state (either layout) into ``optimizer``; returns how many
    parameters got a state."""
    saved = read_optimizer(checkpoint, optimizer, model)
    names = _names_in_order(optimizer, model)
    index = {n: i for i, n in enumerate(names)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    unknown = [n for g in saved["param_groups"] for n in g["params"] if n not in index]
    if unknown or sum(len(g["params"]) for g in saved["param_groups"]) != len(names):
        raise VlmError(f"{checkpoint}: its optimizer steps other parameters than this run "
                       f"({unknown[0] if unknown else 'another count'}): not the same adapter setup")
    state = {}
    for name, entry in saved["state"].items():
        p = params[index[name]]
        entry = _dense_entry(entry)
        state[index[name]] = {k: (_like(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                              for k, v in entry.items()}
    # this optimizer's groups (same split into decay / no-decay), with the saved hyper-parameters
    groups, start = [], 0
    for g, sg in zip(optimizer.param_groups, saved["param_groups"]):
        mine = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        if sorted(index[n] for n in sg["params"]) != mine:
            raise VlmError(f"{checkpoint}: its optimizer groups parameters differently from this run")
        groups.append({**{k: v for k, v in sg.items() if k != "params"}, "params": mine})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return len(state)
