"""Multi-process training: what the recipe needs to know about DDP and FSDP.

The processes are started by ``accelerate launch`` (or torchrun; ``vlm train --nproc N`` calls
accelerate, see ``vlm.train.launch``), which sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``. transformers'
Trainer and accelerate do the distributed work: process group, DDP/FSDP wrapping, sharding the
sampler's indices across processes, gradient averaging, checkpoint format. This module only

- picks the strategy (``distributed.strategy``: auto → FSDP when accelerate was launched with an
  FSDP config, else DDP) and turns it into ``TrainingArguments`` keywords;
- places each process's model on its own GPU (``cuda:LOCAL_RANK``);
- chooses bitsandbytes' 4-bit storage dtype: under FSDP the compute dtype, because FSDP shards only
  floating tensors and wants one dtype per shard group (uint8 4-bit weights would stay unsharded);
- sums per-process counters for the summary (tokens, memory per process);
- reconciles a checkpoint written by N processes with a run on M (see ``reconcile_resume``; across
  FSDP2 and one process / DDP the states are converted on load: ``vlm.train.cross_resume``);
- runs FSDP2 on CPU processes too (``fsdp_on_cpu``: accelerate would silently run DDP there).

Same samples per step on N or M processes: the sampler yields one global order (seed + epoch);
accelerate cuts it into per-process batches of ``batch_size``, so one optimizer step consumes
``batch_size × grad_accum × world_size`` consecutive indices of that order, whatever the split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm.errors import VlmError
from vlm.train.cross_resume import check_readable, crosses, written_by_fsdp  # noqa: F401 (re-exported)

META = "vlmtune_distributed.json"   # written into every checkpoint: world size and global batch


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from the launcher's environment (1 process when not launched)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def strategy(cfg, w: World | None = None) -> str:
    """``single``, ``ddp`` or ``fsdp`` for this run."""
    w = w or world()
    if w.size <= 1:
        return "single"
    s = cfg.distributed.strategy
    if s == "auto":
        return "fsdp" if _env_true("ACCELERATE_USE_FSDP") else "ddp"
    return s


def device_for(device: str, w: World | None = None) -> str:
    """``cuda`` → ``cuda:LOCAL_RANK`` (and make it current) in a multi-process run."""
    w = w or world()
    if w.size > 1 and device == "cuda":
        torch.cuda.set_device(w.local_rank)
        return f"cuda:{w.local_rank}"
    return device


def staging_device(cfg, device: str, strat: str) -> str:
    """Where ``vlm.load`` puts the model: ``device``, except under FSDP on a GPU, where a 16-bit model
    is loaded to host memory and each unit reaches its GPU only when it is sharded
    (``vlm.train.fsdp_units.shard_model``: ``fully_shard`` moves a unit to the process's device,
    keeps its shard there and frees the whole unit). Loaded onto the GPU, every process held the
    whole model there before sharding (2 x H200, Qwen2-VL-7B 16-bit: 15.6 GiB, plus its 7.8 GiB
    half under accelerate's own cut: a 23.47 GiB load peak per GPU for a 7.8 GiB share). The host
    then holds one copy of the model per process while it loads (7B: ~15.6 GiB each), freed unit by
    unit as it is sharded.

    A policy with 4/8-bit weights loads on the GPU as before: bitsandbytes quantizes as it moves
    weights to CUDA, and a quantized weight's state (absmax, code) would not follow ``fully_shard``'s
    move of its data. Method full / projector load on the GPU too (not yet measured staged); for
    them and for 4-bit models ``shard_model`` still frees each unit as it is sharded (peak: the model
    as loaded, not the model plus its shards)."""
    from vlm.train.fast_path import _quantized

    if strat != "fsdp" or not str(device).startswith("cuda") or cfg.method != "lora" or _quantized(cfg.quant):
        return device
    return "cpu"


def quant_storage(cfg, compute_dtype: str, strat: str) -> str | None:
    """bitsandbytes 4-bit storage dtype name for ``vlm.load`` (None: bitsandbytes' uint8)."""
    q = cfg.distributed.quant_storage
    if q == "auto":
        return compute_dtype if strat == "fsdp" else None
    return None if q == "uint8" else q


def training_arguments(cfg, strat: str, device: str, wrap_classes: list[str] | None = None) -> dict:
    """Keywords for ``TrainingArguments`` (empty in a single process). ``wrap_classes``: the module
    classes that become FSDP2 units (``vlm.train.fsdp_units.unit_classes``; None: accelerate's
    default, the model's ``_no_split_modules``)."""
    if strat == "single":
        return {}
    d = cfg.distributed
    kw: dict = {"ddp_backend": d.backend or ("gloo" if device == "cpu" else "nccl"),
                "ddp_find_unused_parameters": d.find_unused_parameters}
    if strat == "fsdp" and not _env_true("ACCELERATE_USE_FSDP"):
        # (on CPU processes accelerate would build the plugin and then run DDP: fsdp_on_cpu below)
        # (with `accelerate launch --use_fsdp` / an FSDP config file, accelerate's own settings rule)
        kw["fsdp"] = True
        kw["fsdp_config"] = {
            "version": d.fsdp_version,
            # true: full shard (ZeRO-3-like); the memory/speed trade of vlm.train.fsdp_units
            "reshard_after_forward": d.fsdp_reshard_after_forward,
            "cpu_offload": d.fsdp_cpu_offload,
            # one unit per decoder layer and one per vision tower (fsdp_units.unit_classes), else the
            # model's `_no_split_modules` (accelerate's default: decoder layers and vision blocks)
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            **({"transformer_layer_cls_to_wrap": list(wrap_classes)} if wrap_classes else {}),
            "state_dict_type": "SHARDED_STATE_DICT" if d.fsdp_state_dict == "sharded" else "FULL_STATE_DICT",
            # gradient checkpointing is set up by vlm.lora (non-reentrant), not by FSDP
            "activation_checkpointing": False,
        }
    return kw


def optimizer_cls_and_kwargs(args, strat: str):
    """For ``Trainer(optimizer_cls_and_kwargs=...)``: bitsandbytes' 8-bit optimizers made to step
    FSDP2's sharded parameters (``vlm.train.sharded_optim``); under FSDP2 torch's AdamW stepping the
    local shards (``vlm.train.local_step``); None (Trainer's own choice) otherwise.

    Under FSDP2 the optimizer states are then 8-bit *and* split over the processes. In one process
    or DDP the same class steps exactly as bitsandbytes' own and also loads the dense moments of an
    FSDP2 checkpoint (``vlm.train.cross_resume``)."""
    from transformers import Trainer

    from vlm.train.sharded_optim import is_bitsandbytes_optimizer, shard_local

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if strat == "fsdp":   # torch's AdamW: the same step on the local shards, no DTensor dispatch
        from vlm.train.local_step import local_shard_step

        local = local_shard_step(cls)
        if local is not None:
            return local, kwargs
    if not is_bitsandbytes_optimizer(cls):
        return None
    return shard_local(cls), kwargs


def one_device_per_process(args, strat: str, w: World) -> str | None:
    """A single process on a host with several GPUs trains on its one GPU, never ``DataParallel``.

    transformers' Trainer wraps the model in ``nn.DataParallel`` when it sees several GPUs and no
    distributed launch (``args.n_gpu > 1``); that breaks on scalar outputs and is the slow way to use
    them anyway. Setting ``_n_gpu`` to 1 is transformers' own switch for that (it does the same for
    model-parallel models). Returns the note to print, or None."""
    if strat != "single" or args.n_gpu <= 1:
        return None
    n = args.n_gpu
    args._n_gpu = 1
    return (f"note: {n} GPUs visible, one process: training on {args.device} only. To use all of them: "
            f"vlm train CONFIG --nproc {n} (DDP; distributed.strategy=fsdp to shard the model)")


def fsdp_on_cpu(trainer) -> bool:
    """Run FSDP2 on CPU processes (gloo), as accelerate does on GPUs.

    accelerate picks FSDP only for accelerator process groups: on CPU it builds the FSDP plugin from
    ``fsdp_config`` and then runs DDP. FSDP2 itself (``fully_shard``, DTensor, DCP checkpoints) works
    on CPU with gloo, so for CPU processes the plugin is installed here (what accelerate's state
    would hold on GPUs): tests and CPU-only machines then run the very code path of a GPU FSDP run.
    Returns True when it did so."""
    args = trainer.args
    if args.fsdp_plugin_args is None or getattr(trainer, "is_fsdp_enabled", False):
        return False
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.distributed_type = DistributedType.FSDP
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if state.mixed_precision != "no":   # what accelerate's state does for a GPU FSDP plugin
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    return True


def fsdp2_precision(trainer) -> bool:
    """FSDP2's mixed-precision policy for our runs: compute in the training dtype, gradients reduced
    across processes in fp32, the model's outputs left in the dtype it returns them. Returns True when
    it set the policy.

    accelerate derives the policy from the mixed precision alone — param, reduce *and output* dtype
    bf16 — so the loss came back rounded to bf16 (2 × H200, Qwen2-VL-2B: 12.2500 where one process
    logs 12.2256, `benchmarks/results/multi_gpu_packed_2b_NVIDIA_H200.md`) and the trainable weights'
    gradients were averaged in bf16, where DDP averages LoRA's fp32 gradients in fp32. Reducing in
    fp32 costs bytes only for what trains (LoRA: a few MB per step); FSDP2 casts each reduced shard
    back to its parameter's dtype."""
    state = trainer.accelerator.state
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
        return False
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(state.mixed_precision))
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32,
                                                         output_dtype=None)
    return True


def check_engaged(trainer, strat: str) -> None:
    """FSDP asked for must be FSDP running (accelerate falls back to DDP without saying so)."""
    if strat == "fsdp" and not getattr(trainer, "is_fsdp_enabled", False):
        raise VlmError("distributed: FSDP was asked for but accelerate did not enable it")


def global_batch(args) -> int:
    """Samples per optimizer step over all processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)


def write_meta(checkpoint_dir: str | os.PathLike, args) -> None:
    """Record how the checkpoint was trained (read back by ``reconcile_resume``)."""
    meta = {"world_size": int(args.world_size), "per_device_batch_size": args.per_device_train_batch_size,
            "grad_accum": args.gradient_accumulation_steps, "global_batch": global_batch(args)}
    (Path(checkpoint_dir) / META).write_text(json.dumps(meta) + "\n")


def reconcile_resume(checkpoint: Path | None, cfg, w: World | None = None,
                     strat: str | None = None) -> str | None:
    """Resume a checkpoint from N processes on M: keep the global batch, or refuse.

    Trainer resumes by skipping ``global_step × grad_accum`` per-process batches; that lands on the
    right sample only if the global batch is unchanged. When it would change (same per-device batch,
    other process count) ``training.grad_accum`` is set so that it is not (2 processes × accum 1 →
    1 process × accum 2) and a note is returned; when no whole number does, an error says what to set.
    """
    if checkpoint is None:
        return None
    w = w or world()
    if strat is not None and crosses(checkpoint, strat == "fsdp"):
        # FSDP2 (DCP folders) <-> one process / DDP (optimizer.pt): VlmTrainer converts on load
        check_readable(Path(checkpoint), cfg.method)
    if not (Path(checkpoint) / META).is_file():
        return None
    meta = json.loads((Path(checkpoint) / META).read_text())
    want = int(meta["global_batch"])
    t = cfg.training
    have = t.batch_size * t.grad_accum * w.size
    if have == want:
        return None
    per_step = t.batch_size * w.size
    if want % per_step:
        raise VlmError(f"{checkpoint} was trained with a global batch of {want} samples "
                       f"({meta['world_size']} process(es) × batch {meta['per_device_batch_size']} × "
                       f"accum {meta['grad_accum']}); here batch {t.batch_size} × {w.size} process(es) "
                       f"does not divide it: set training.batch_size and training.grad_accum so that "
                       f"batch_size × grad_accum × {w.size} = {want}")
    old = t.grad_accum
    t.grad_accum = want // per_step
    return (f"resume: {checkpoint.name} was trained on {meta['world_size']} process(es), this run has "
            f"{w.size}: training.grad_accum {old} → {t.grad_accum} keeps the global batch at {want}")


def sum_over_processes(trainer, value: float) -> float:
    """Sum of ``value`` over all processes (a collective: every process must call it)."""
    if trainer.args.world_size <= 1:
        return value
    t = torch.tensor([float(value)], device=trainer.args.device, dtype=torch.float64)
    return float(trainer.accelerator.reduce(t, reduction="sum").item())


def gather_per_process(trainer, value: int) -> list[int]:
    """``value`` from every process, by rank (a collective)."""
    if trainer.args.world_size <= 1:
        return [int(value)]
    t = torch.tensor([int(value)], device=trainer.args.device, dtype=torch.int64)
    return [int(v) for v in trainer.accelerator.gather(t).tolist()]


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on CPU (a collective under FSDP2: every process calls it).

    FSDP2 keeps parameter names and makes each parameter a DTensor shard; gathering only the
    trainable ones (LoRA, modules_to_save) costs megabytes, not the base model's gigabytes.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().cpu()
    if any("_fsdp_wrapped_module" in n or "_flat_param" in n for n in out):
        raise VlmError("distributed.fsdp_version 1 flattens parameters: use fsdp_version 2")
    return out

