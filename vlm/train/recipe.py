"""The LoRA / QLoRA recipe, top to bottom.

    config ─► load (per-component quant policy) ─► data (read, validate, plan lengths) ─► LoRA (or
    method full / projector: vlm.train.modes)
    ─► fast path (batched vision attention, kernels.patch, torch.compile, CUDA graphs:
    vlm.train.fast_path) ─► VlmTrainer (transformers Trainer: checkpoints, logging, mixed precision,
    distributed launch) ─► adapter folder + processor + metadata + summary.json + loss_curve.png

Resume (``resume=True``) continues from the newest *complete* checkpoint in the output folder:
optimizer, scheduler, RNG states and data position come from transformers' own resume path. What
``--resume`` may and may not do with the folder is in vlm.train.checkpoints; here: a config that
differs from the checkpoint's is named in a warning, ``summary.json`` counts the whole run (every
segment's tokens and time), and a finished run is never overwritten: not by a new run in its
folder, nor by a resume that has nothing left to train.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm.errors import ConfigError
from vlm.atomic import ensure_writable_folder, write_json
from vlm.train import checkpointing, fast_path, modes
from vlm.train.checkpoints import checkpoint_record, resume_point, run_totals
from vlm.train.config import TrainConfig, to_plain

log = logging.getLogger("vlm.train")

ADAPTER_DIR = "adapter"


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    summary: dict[str, Any]


def _precision_flags(precision: str, device: str) -> dict[str, bool]:
    if precision == "fp32":
        return {"bf16": False, "fp16": False}
    if precision == "fp16" and device == "cpu":
        raise ConfigError("training.precision: fp16 mixed precision needs a GPU; use bf16 or fp32 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _optimizer_name(name: str) -> str:
    return {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit",
            "paged_adamw_8bit": "paged_adamw_8bit", "sgd": "sgd"}[name]


def batch_transfer_arguments(device: str) -> dict[str, Any]:
    """TrainingArguments for how batches reach the device. accelerate copies every tensor of every
    batch with non_blocking=False by default: a copy plus a stream sync each (~10 per micro-batch, the
    host waiting for the GPU at every one). From the DataLoader's pinned memory
    (``dataloader_pin_memory``, on by default; transformers turns it off on CPU) they are queued."""
    if str(device).startswith("cpu"):
        return {}   # nothing to copy; transformers would warn that nothing is pinned
    return {"accelerator_config": {"non_blocking": True}, "dataloader_pin_memory": True}


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Run the recipe; returns where everything was written and the summary."""
    from transformers import TrainingArguments, set_seed

    import vlm
    from vlm.data_formats.collator import VisionChatCollator
    from vlm.data_formats.resolution import Resolution
    from vlm.lora import apply_lora
    from vlm.train import distributed as dist
    from vlm.train.metrics import plot_loss_curve
    from vlm.quant.loading import quant_metadata
    from vlm.train import packed_forward
    from vlm.train.dataset import prepare_train_set, resolve_workers, sampler_factory, token_budget_groups
    from vlm.train.startup_clock import import_split, imports_without_pyc
    from vlm.train.trainer import VlmTrainer, dynamo_graphs, steady_rate

    t_start = time.perf_counter()
    # the import clock's packages, now (later imports belong to later phases)
    imports = {"split": import_split(), "without_pyc": imports_without_pyc()}
    w = dist.world()
    strat = dist.strategy(cfg, w)  # single / ddp / fsdp: processes come from accelerate launch
    out = ensure_writable_folder(cfg.output)  # read-only / full / forbidden: said now, not at the first save
    plain_cfg = to_plain(cfg)  # as given: recorded in checkpoints, before resume adjusts the batch
    resume_from = resume_point(out, plain_cfg, resume, say=print if w.is_main else (lambda _: None))
    if resume:
        note = dist.reconcile_resume(resume_from, cfg, w, strat)  # N processes -> M: same global batch
        if note and w.is_main:
            print(note)
    set_seed(cfg.training.seed)
    device = dist.device_for(cfg.model.device or ("cuda" if torch.cuda.is_available() else "cpu"), w)
    plan = fast_path.resolve(cfg, device, strat)
    if plan.compiled:   # inductor's compile workers boot while the model loads (vlm.train.compile)
        from vlm.train.compile import start_compile_workers

        start_compile_workers(device)
    precision = _precision_flags(cfg.training.precision, device)
    autocast_dtype = None
    if strat == "fsdp" and cfg.method != "lora" and cfg.training.precision != "fp32":
        # accelerate's FSDP2 mixed precision upcasts every trainable weight to an fp32 master (16 bytes
        # per parameter: what method full/projector exist to avoid). The weights are already 16-bit:
        # FSDP2 without accelerate's mixed precision keeps them so, and the forward runs under the
        # same autocast as one process (VlmTrainer.autocast_dtype): the same numerics.
        if cfg.training.precision == "fp16":
            raise ConfigError(f"method: {cfg.method} under FSDP: training.precision fp16 needs accelerate's "
                              "loss scaling, whose FSDP2 path keeps fp32 master weights; use precision bf16")
        precision, autocast_dtype = {"bf16": False, "fp16": False}, torch.bfloat16

    # the data section's image root and bad-record policy hold for calibration records too
    calibration = ({"path": cfg.data.train[0].path, "image_root": cfg.data.image_root,
                    "on_error": cfg.data.on_error} if cfg.data.train else None)
    # FSDP on GPUs: a 16-bit model loads to host memory; each unit reaches the GPU as it is sharded
    load_device = dist.staging_device(cfg, device, strat)
    model, processor = vlm.load(cfg.model.path, dtype=cfg.model.dtype, device=load_device, quant=cfg.quant,
                                calibration=calibration,
                                quant_storage=dist.quant_storage(cfg, cfg.model.dtype, strat))
    family = model.vlm_family
    resolution = Resolution(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                            longest_edge=cfg.data.longest_edge)
    collator = VisionChatCollator(processor, family, max_length=cfg.data.max_length,
                                  train_on=cfg.data.train_on, overlong=cfg.data.overlong,
                                  video_fps=cfg.data.video_fps, video_max_frames=cfg.data.video_max_frames,
                                  pad_to_multiple_of=plan.pad_to,
                                  resolution=None if resolution.is_default() else resolution)
    t_loaded = time.perf_counter()
    train_set, data_report = prepare_train_set(cfg, collator, out)
    data_collator, budget = collator, None
    if cfg.data.max_tokens_per_batch:
        budget = token_budget_groups(cfg, train_set, collator, family, cuda_graphs=plan.cuda_graphs,
                                     mrope_positions=packed_forward.collator_positions(model, family))
        data_collator = budget.collator
        data_report["token_budget"] = budget.report()
        print(token_budget_line(budget))
    t_data = time.perf_counter()
    from vlm.train.compile import compile_workers_ready
    from vlm.train.startup_clock import StepClock

    # the next phase step by step: on a warm GPU start it took 4.7 s against 0.6 s cold (H200, 7B QLoRA)
    setup_clock = StepClock()
    workers_ready_at_data = compile_workers_ready() if plan.compiled else None
    if str(device).startswith("cuda") and torch.cuda.is_initialized():
        torch.cuda.synchronize()   # GPU work the load left queued: waited for here, not in a later step
        setup_clock.mark("gpu_queue")

    mode = None                    # method: full / projector (vlm.train.modes); lora below
    if cfg.model.projector_init:
        print(f"model.projector_init: {modes.load_projector(model, family, cfg.model.projector_init)} "
              f"projector tensors from {cfg.model.projector_init}"
              + (" (the projector trains and is saved in the adapter: lora.modules_to_save)"
                 if cfg.method == "lora" else ""))
    if cfg.method != "lora":
        if strat == "fsdp" and cfg.distributed.fsdp_version != 2:
            raise ConfigError(
                f"method: {cfg.method} under FSDP needs distributed.fsdp_version: 2 (FSDP1 flattens the "
                "parameters into 1-D FlatParameters: BF16AdamW could not tell norm weights, which keep an "
                "fp32 master, from matrices, nor key its rounding by an element's place in its weight)")
        if strat == "fsdp" and cfg.distributed.fsdp_state_dict == "full":
            raise ConfigError(
                f"method: {cfg.method} under FSDP needs distributed.fsdp_state_dict: sharded. With full, "
                "transformers' Trainer writes each checkpoint by save_pretrained on the main process over the "
                "sharded model, which gathers weights there alone: a collective the other processes do not "
                "join (seen: gloo aborts with a size mismatch). Sharded checkpoints resume on any process "
                "count and strategy, and OUT/model is a gathered standard checkpoint either way")
        mode = modes.prepare(model, family, cfg, device=device, strategy=strat)
        print(modes.describe(mode, cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode is None:
            model = apply_lora(model, family, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                               targets=cfg.lora.targets, modules_to_save=modes.lora_modules_to_save(model, family, cfg),
                               use_rslora=cfg.lora.use_rslora,
                               gradient_checkpointing=checkpointing.resolve(model, cfg, device, strat).enabled)
    for caught_warning in caught:   # not `w`: that is the process world, used after training
        if str(caught_warning.message).startswith("vLLM serving:"):
            print(f"warning: {caught_warning.message}")
        else:  # every other warning goes back to Python's machinery (filters, -W, logging capture)
            warnings.warn_explicit(caught_warning.message, caught_warning.category,
                                   caught_warning.filename, caught_warning.lineno, source=caught_warning.source)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    setup_clock.mark("lora" if mode is None else "method")
    fast = fast_path.apply(model, family, cfg, plan, train_set.lengths, device=device, clock=setup_clock)
    packing_hook = (packed_forward.enable(model, family, varlen=cfg.training.packed_attention == "varlen",
                                          cuda_graphs=plan.cuda_graphs)
                    if budget is not None and budget.packed else None)
    if packing_hook is not None and w.is_main:
        print("attention: per sample over packed boundaries (varlen)" if packing_hook.varlen
              else f"attention: block mask over packed rows ({packing_hook.varlen_refusal})")
    setup_clock.mark("packing")
    t_ready = time.perf_counter()
    workers_ready = compile_workers_ready() if plan.compiled else None   # None: no pool (CPU, eager)
    setup_split = {**setup_clock.split(), "compile_workers_ready_at_start": workers_ready_at_data}
    from vlm.train.fsdp_units import Layout, unit_classes

    workers = resolve_workers(cfg.data.num_workers, device)
    replicate = cfg.distributed.fsdp_frozen_towers == "replicate"

    report_to = list(cfg.logging.report_to)
    if cfg.logging.tensorboard and "tensorboard" not in report_to:
        report_to.append("tensorboard")
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.training.batch_size,   # rows of the token budget, if set
        gradient_accumulation_steps=cfg.training.grad_accum,
        learning_rate=cfg.training.lr,
        lr_scheduler_type=cfg.training.schedule,
        warmup_steps=cfg.training.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        num_train_epochs=cfg.training.epochs,
        max_steps=cfg.training.max_steps,
        weight_decay=cfg.training.weight_decay,
        max_grad_norm=cfg.training.max_grad_norm,
        optim=_optimizer_name(cfg.training.optimizer),
        seed=cfg.training.seed,
        data_seed=cfg.training.seed,
        save_strategy="steps",
        save_steps=cfg.training.save_steps,
        save_total_limit=cfg.training.save_total_limit,
        logging_steps=cfg.training.logging_steps,
        report_to=report_to or "none",
        remove_unused_columns=False,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_prefetch_factor=4 if workers > 0 else None,
        disable_tqdm=not (cfg.logging.progress if progress is None else progress),
        use_cpu=device == "cpu",
        gradient_checkpointing=False,  # set up by apply_lora (non-reentrant) before PEFT wraps
        # the Trainer's NaN/inf filter reads every micro-batch's loss on the host (a GPU wait each);
        # off, a non-finite loss shows in the log as it is instead of being replaced by the mean
        logging_nan_inf_filter=False,
        **batch_transfer_arguments(device),
        **precision,
        **dist.training_arguments(cfg, strat, "cpu" if device == "cpu" else "cuda",
                                  wrap_classes=unit_classes(model, family, replicate,
                                                            tower_blocks=cfg.distributed.fsdp_frozen_towers == "blocks")
                                  if strat == "fsdp" else None),
    )
    note = dist.one_device_per_process(args, strat, w)
    if note and w.is_main:
        print(note)
    rows = budget.dataset if budget is not None else train_set
    trainer = VlmTrainer(model=model, args=args, train_dataset=rows, data_collator=data_collator,
                         train_sampler_factory=sampler_factory(rows, cfg.training.seed,
                                                               cfg.data.group_by_length and budget is None),
                         optimizer_cls_and_kwargs=(mode.optimizer_cls_and_kwargs if mode else None)
                         or dist.optimizer_cls_and_kwargs(args, strat))
    if strat == "fsdp":   # layer groups, replicated towers, prefetch between the units (fsdp_units)
        d = cfg.distributed
        trainer.fsdp_layout = Layout(family, d.fsdp_layers_per_unit, replicate, d.fsdp_reshard_after_forward,
                                     say=print if w.is_main else (lambda _: None))
        trainer.add_callback(trainer.fsdp_layout.callback())
    # where the training peak is reached: eager runs (hooks in a compiled layer would break its graph)
    if torch.cuda.is_available() and str(device).startswith("cuda") and not plan.compiled:
        from vlm.train import peak_phase

        trainer.peak_phases = peak_phase.PeakPhases()
        trainer.add_callback(peak_phase.callback(trainer.peak_phases, family))
    if cfg.logging.profile_steps:   # every process: rank r > 0 writes profile_rank{r}.txt
        from vlm.train.profiling import StepProfiler
        trainer.add_callback(StepProfiler(*cfg.logging.profile_steps, out, rank=w.rank))
    trainer.autocast_dtype = autocast_dtype
    if plan.cuda_graphs:   # a step mark before each micro-batch, and the narrow fallback (graph_steps)
        from vlm.train.graph_steps import GraphSteps

        trainer.graph_steps = GraphSteps(trainer, model, family)
    record = checkpoint_record(resume_from)  # read now: rotation may remove that folder later
    before, resumed_step = run_totals(record), record.get("step")
    trainer.checkpoint_record, trainer.run_before, trainer.segment_start = {"config": plain_cfg}, before, t_start
    dist.check_engaged(trainer, strat)
    if cfg.method == "projector":   # checkpoints hold the projector only (the rest is the frozen base)
        trainer.save_weights = lambda folder: modes.save_projector_checkpoint(model, family, folder,
                                                                              write=w.is_main)
    if resume_from and mode is not None and not (strat == "fsdp" and cfg.method == "full"
                                                 and dist.written_by_fsdp(resume_from)):
        # before sharding; Trainer's own load misses renamed keys (and cannot cross strategies).
        # An FSDP2 full checkpoint under FSDP2: Trainer's DCP load reads each process's shards only
        modes.resume_weights(model, family, resume_from)
        trainer.weights_resumed = True
    try:
        train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        if packing_hook is not None:
            packing_hook.remove()
    startup = startup_report(t_start, t_loaded, t_data, t_ready, trainer, imports)
    startup["lora_and_fast_path_split"] = setup_split
    startup["compile_workers_ready"] = workers_ready   # inductor's pool up before the first step?
    if w.is_main:
        print("\n".join(startup_lines(startup)))
    if resumed_step == trainer.state.global_step and (out / "summary.json").is_file():
        # resumed a run that had finished: nothing was trained, its adapter and summary stand
        if w.is_main:
            print(f"--resume: {out} had already finished at step {resumed_step}; nothing left to train "
                  f"(raise training.max_steps or training.epochs to continue): adapter/ and summary.json kept")
        return TrainResult(out, out / ADAPTER_DIR, json.loads((out / "summary.json").read_text()))

    adapter_dir = out / ADAPTER_DIR
    # collectives first (every process), then only the main process writes
    adapter_state = dist.adapter_state_dict(model) if strat == "fsdp" and mode is None else None
    output_state = modes.gathered_output_state(model, family, cfg) if strat == "fsdp" and mode else None
    tokens = dist.sum_over_processes(trainer, trainer.tokens_seen)
    label_tokens = dist.sum_over_processes(trainer, trainer.label_tokens_seen)
    computed = dist.sum_over_processes(trainer, trainer.computed_tokens)
    peak_per_process = dist.gather_per_process(trainer, trainer.peak_memory_bytes())
    load_peak_per_process = dist.gather_per_process(trainer, trainer.load_peak_bytes or 0)
    # steady window: after STEADY_AFTER and after the last step that compiled in ANY process (a rank
    # recompiling for a new shape stalls the others in the next collective)
    steady_after = max(dist.gather_per_process(trainer, trainer.steady_after()))
    profiled = cfg.logging.profile_steps   # the profiler slows its steps: the window ends before them
    steady = dist.sum_over_processes(trainer, steady_rate(trainer.step_times, steady_after,
                                                          until_step=profiled[0] - 1 if profiled else None) or 0.0)
    # per trained parameter: weight + grad + optimizer state (under FSDP2: per element of the shards)
    per_param = modes.bytes_per_parameter(model, trainer.optimizer)
    from vlm.train.fsdp_units import sharding_report

    sharding = sharding_report(model)   # FSDP2: this process's shards, the units, the root's share
    param_bytes_per_process = dist.gather_per_process(trainer, sharding.pop("parameter_bytes_this_process"))
    if w.is_main and strat == "fsdp":
        print(f"fsdp: {sharding['fsdp_units']} units; parameter bytes per process "
              f"{', '.join(f'{b / 2**20:.1f}' for b in param_bytes_per_process)} MiB of "
              f"{sharding['parameter_bytes_whole'] / 2**20:.1f} MiB; the root unit keeps "
              f"{sharding.get('root_unit_bytes_whole', 0) / 2**20:.1f} MiB whole through the step")
    if w.is_main and mode is not None:
        adapter_dir = modes.save_output(model, processor, out, cfg=cfg, resolution=resolution,
                                        state_dict=output_state)
    elif w.is_main:
        save_adapter(model, processor, adapter_dir, cfg=cfg, resolution=resolution, state_dict=adapter_state)
    history = trainer.state.log_history
    if w.is_main:
        plot_loss_curve(history, out / "loss_curve.png", title=f"{Path(cfg.model.path).name}: training loss")
    losses = [h["loss"] for h in history if "loss" in h]
    segment = {"tokens": int(tokens), "label_tokens": int(label_tokens),
               "train_seconds": round(trainer.train_seconds, 3),
               "wall_seconds": round(time.perf_counter() - t_start, 3)}
    whole = {k: before[k] + segment[k] for k in segment}  # the whole run: every segment so far
    summary = {
        "model": cfg.model.path,
        "family": family.name,
        **modes.summary_fields(mode, cfg),
        "quant": (quant_metadata(model) or {}).get("counts"),
        "kernels": None if fast.kernels is None else dataclasses.asdict(fast.kernels),
        "compiled_layers": plan.compiled,
        "vision_attention_batched": fast.vision_attention_batched,
        "compiled_vision_blocks": fast.compiled_vision_blocks,
        "dynamo_graphs": dynamo_graphs(),      # graphs torch.compile built in this process
        "compile_steps": trainer.compile_steps,   # optimizer steps that compiled (this process)
        "steady_after_step": steady_after,
        "mlp_chunks": fast.mlp_chunks,
        "cuda_graphs": plan.cuda_graphs,
        # micro-batches begun with torch's CUDA-graph step mark (vlm.train.graph_steps)
        "cuda_graph_step_marks": trainer.graph_steps.marks if trainer.graph_steps else 0,
        # None, or the step at which CUDA-graph replay failed and the layers went on without graphs
        "cuda_graphs_fallback": trainer.graph_steps.fallback if trainer.graph_steps else None,
        "padded_to": plan.pad_to,
        "dataloader_workers": workers,
        "startup_seconds": startup,
        "data_wait_seconds": round(trainer.data_wait_seconds, 3),
        "step_times": trainer.step_times,
        "steps": trainer.state.global_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "epochs": trainer.state.epoch,
        "samples": len(train_set),
        "data": data_report,
        "processes": w.size,
        "strategy": strat,
        "tokens": int(whole["tokens"]),     # over all processes and all segments of the run
        "label_tokens": int(whole["label_tokens"]),
        "train_seconds": round(whole["train_seconds"], 3),
        "wall_seconds": round(whole["wall_seconds"], 3),
        "tokens_per_s": round(whole["tokens"] / whole["train_seconds"], 1) if whole["train_seconds"] else None,
        "computed_tokens": int(computed),   # this segment's, padding included
        "padding_fraction": round(1 - tokens / computed, 4) if computed else None,
        # this segment's, after step steady_after (warm-up and every compile excluded), summed over
        # processes; None when the run ended less than two steps after its last compile
        "tokens_per_s_steady": round(steady, 1) if steady else None,
        "segments": int(before["segments"]) + 1,
        "this_segment": segment,            # what this invocation (after a resume: since it) did
        "peak_memory_bytes": trainer.peak_memory_bytes(),
        "peak_memory_bytes_per_process": peak_per_process,       # training (from the first step)
        "load_peak_memory_bytes_per_process": load_peak_per_process,  # before the first step
        "parameter_bytes_per_process": param_bytes_per_process,     # FSDP: each process's shards
        "sharding": sharding,    # whole parameter bytes; FSDP units and what the root unit holds whole
        "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss",
        # this process's: the phase of the step in which the training peak was reached (CUDA)
        "training_peak_phase": trainer.peak_phases.report() if trainer.peak_phases is not None else None,
        "trainable_parameters": trainable,
        "bytes_per_trained_parameter": per_param,
        "final_loss": losses[-1] if losses else None,
        "train_loss": train_output.training_loss if trainer.state.global_step != resumed_step else None,
        "loss_history": [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h],
        "config": to_plain(cfg),
    }
    if w.is_main:
        write_json(out / "summary.json", summary)
    return TrainResult(out, adapter_dir, summary)



def token_budget_line(budget) -> str:
    r = budget.report()
    how = (f"packed, {r['samples_per_row']} samples per row on average, padded to {r['length_buckets']} "
           "length bucket(s)" if budget.packed else "padded rows of similar length")
    line = (f"data: micro-batches of <= {r['max_tokens_per_batch']} tokens ({how}): {r['rows']} rows, "
            f"{r['tokens_per_row']:.0f} tokens per row, {r['padding_fraction']:.1%} of computed tokens are padding")
    if budget.refusal:
        line += f"\ndata: packing off ({budget.refusal})"
    return line


def startup_report(t_start: float, t_loaded: float, t_data: float, t_ready: float, trainer,
                   imports: dict | None = None) -> dict:
    """Where the time before the first optimizer step went (seconds): process start (imports),
    model load (+ quantization), data (read, validate, plan), LoRA + fast path, first step (the
    compile and first data fetch happen there), and process start -> first step done. Opened up
    (vlm.train.startup_clock): ``imports_split`` (seconds per top-level package, when the CLI's
    import clock ran) and the first step's ``first_step_compile_s`` (torch.compile: dynamo tracing,
    AOT autograd + inductor or their cache loads, backward compile) vs ``first_step_run_s``, with
    the phases and cache hits in ``first_step_compile``; ``first_step_setup_s`` is the Trainer's
    setup before its loop (optimizer, accelerate's prepare, DataLoader), ``first_step_data_wait_s``
    the part of the run blocked on the DataLoader."""
    from vlm.train.startup_clock import process_start_perf

    process_start = process_start_perf()
    first = trainer.first_step_end
    first_s = first - t_ready if first is not None else None
    compiled = trainer.first_step_compile or {}
    compile_s = min(compiled.get("compile_s", 0.0), first_s) if first_s is not None else None
    # TrainingArguments, the Trainer, accelerate's prepare, the optimizer: before the loop begins
    setup_s = (min(trainer.train_begin - t_ready, first_s - compile_s)
               if first_s is not None and trainer.train_begin is not None else 0.0)
    return {
        "imports_s": round(t_start - process_start, 2) if process_start is not None else None,
        "load_s": round(t_loaded - t_start, 2),
        "data_s": round(t_data - t_loaded, 2),
        "lora_and_fast_path_s": round(t_ready - t_data, 2),
        "first_step_s": round(first_s, 2) if first_s is not None else None,
        "to_first_step_s": round(first - (process_start if process_start is not None else t_start), 2)
        if first is not None else None,
        "first_step_compile_s": round(compile_s, 2) if compile_s is not None else None,
        "first_step_setup_s": round(setup_s, 2) if first_s is not None else None,
        "first_step_run_s": round(first_s - compile_s - setup_s, 2) if first_s is not None else None,
        # of the run: blocked on the DataLoader (worker start, the first images decoded and collated)
        "first_step_data_wait_s": (round(trainer.first_step_data_wait, 2)
                                   if trainer.first_step_data_wait is not None else None),
        "imports_split": (imports or {}).get("split"),
        # modules compiled from source (no .pyc): every run pays that where the cache cannot be written
        "imports_without_pyc": (imports or {}).get("without_pyc"),
        "first_step_compile": compiled or None,
    }


def startup_lines(startup: dict) -> list[str]:
    """The startup report as log lines: phases, then the imports and the first step opened up."""
    from vlm.train.startup_clock import MANY_WITHOUT_PYC, bytecode_hint, describe_compile

    phases = ("imports_s", "load_s", "data_s", "lora_and_fast_path_s", "first_step_s", "to_first_step_s")
    lines = ["startup: " + ", ".join(f"{k.removesuffix('_s')} {startup[k]:.1f} s" for k in phases
                                     if startup.get(k) is not None)]
    if startup.get("lora_and_fast_path_split"):
        from vlm.train.startup_clock import describe_steps

        split = startup["lora_and_fast_path_split"]
        ready = split.get("compile_workers_ready_at_start")
        lines.append(describe_steps("lora_and_fast_path", split)
                     + ("" if ready is None else
                        f"; inductor's compile workers {'were up' if ready else 'were still booting (they share the CPU)'} "
                        "when it began"))
    if startup.get("imports_split"):
        nopyc = startup.get("imports_without_pyc") or {}
        lines.append("startup: imports " + ", ".join(f"{k} {v:.1f}" for k, v in startup["imports_split"].items())
                     + " s" + (f"; {nopyc['modules']} modules had no .pyc (compiled from source: {nopyc['s']:.1f} s "
                               "of the above)" if nopyc.get("modules") else ""))
        if (nopyc.get("modules") or 0) >= MANY_WITHOUT_PYC:
            lines.append(bytecode_hint())
    if startup.get("first_step_s") is not None:
        lines.append("startup: " + describe_compile(startup.get("first_step_compile") or {}, startup["first_step_s"],
                                                      startup.get("first_step_data_wait_s"),
                                                      startup.get("first_step_setup_s"))
                     + ("" if startup.get("compile_workers_ready") is None else
                        f"; inductor's compile workers {'were' if startup['compile_workers_ready'] else 'were not yet'} "
                        "up when training began"))
    return lines


def save_adapter(model, processor, adapter_dir: Path, *, cfg: TrainConfig, resolution,
                 state_dict: dict | None = None) -> Path:
    """PEFT adapter + processor files + ``vlmtune.json`` (policy, pixel limits), atomically.

    ``state_dict``: the gathered trainable weights when the model is sharded (FSDP)."""
    from vlm.atomic import replacing_folder, write_json
    from vlm.data_formats.resolution import save_resolution
    from vlm.quant.loading import quant_metadata

    with replacing_folder(adapter_dir) as tmp:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        processor.save_pretrained(tmp)
        meta = {"base_model": cfg.model.path, "family": model.vlm_family.name,
                "quant": quant_metadata(model), "projector_init": cfg.model.projector_init,
                "lora": to_plain(cfg.lora)}
        write_json(tmp / "vlmtune.json", {"vlmtune": meta})
        save_resolution(tmp, resolution)
    return adapter_dir

