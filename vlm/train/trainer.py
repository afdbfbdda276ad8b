"""``VlmTrainer``: transformers' Trainer plus what VLM fine-tuning needs.

- atomic checkpoints (``vlm.train.checkpoints``) that record their process count and global batch
  (``vlm.train.distributed``: resume on another number of processes), their config and the run's
  totals so far (tokens, seconds, segments),
- tokens counted per step (non-padding tokens) for tokens/s, over the whole run and in steady state
  (after optimizer step ``STEADY_AFTER`` and after the last step in which torch.compile built a graph
  in any process: ``compile_steps``; a late recompile — a new shape — restarts the window),
- peak memory split into loading (everything before the first step) and training,
- an optional sampler supplied by the data pipeline (length-grouped, seeded: resume-exact),
- loss computed by the model (so fused-CE kernels patched into the model apply),
- a clock per optimizer step (``step_times``: seconds since the first step began, non-padding tokens
  and seconds waited for data so far; CUDA synchronized, so a steady-state rate can skip the warm-up/compile steps), the end of
  the first step (``first_step_end``, for the startup report) and the time the loop spent waiting for
  the next batch from the DataLoader (``data_wait_seconds``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from vlm.atomic import space_error
from vlm.train.checkpoints import begin_save, mark_complete
from vlm.train.startup_clock import compile_split

STEADY_AFTER = 2   # optimizer steps left out of the steady-state rate (compile, allocator warm-up)


def dynamo_graphs() -> int:
    """How many graphs dynamo compiled in this process so far (0 when nothing was compiled)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:   # pragma: no cover - torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def steady_rate(step_times: list, after_step: int, until_step: int | None = None) -> float | None:
    """Non-padding tokens per second over the optimizer steps after ``after_step`` (up to
    ``until_step`` when given: profiled steps run slower and are left out), from the step clock
    (``(step, seconds, tokens, data wait)`` per step); None when fewer than two steps follow it (a
    steady rate needs a window, not one step)."""
    start = [e for e in step_times if e[0] <= after_step]
    kept = [e for e in step_times if until_step is None or e[0] <= until_step]
    end = kept[-1] if kept else None
    if not start or end is None or end[0] - start[-1][0] < 2 or end[1] <= start[-1][1]:
        return None
    return (end[2] - start[-1][2]) / (end[1] - start[-1][1])


class VlmTrainer(Trainer):
    def __init__(self, *args, train_sampler_factory=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._train_sampler_factory = train_sampler_factory
        self._tokens_seen = 0         # non-padding tokens through forward (this process)
        self._label_tokens_seen = 0   # tokens that carried a loss
        # this step's counts so far, on the batch's device: read once at step end (the step clock has
        # synchronized by then), not per micro-batch — a scalar read makes the host wait for the GPU
        self._pending_counts: torch.Tensor | None = None
        self.computed_tokens = 0      # tokens through forward, padding included
        self.train_seconds = 0.0      # wall time from the first step's start to the last log
        self._t0 = None
        self._tokens0 = 0
        self.first_step_end = None    # perf_counter when the first optimizer step was done
        self.first_step_compile: dict = {}   # torch.compile's time by phase up to then (startup_clock)
        self.first_step_data_wait = None     # seconds the first step waited for its micro-batches
        self.train_begin = None       # perf_counter when the training loop began (setup done)
        # (step, seconds since the first step began, tokens, seconds waited for data): all cumulative
        self.step_times: list[tuple[int, float, int, float]] = []
        self.data_wait_seconds = 0.0
        self.add_callback(_StepClock(self))
        self.compile_steps: list[int] = []   # optimizer steps in which this process compiled a graph
        self._graphs_seen = dynamo_graphs()
        self.load_peak_bytes = None   # peak memory before the first step (model load, data, setup)
        # set by the recipe: recorded in each checkpoint's completion marker (vlm.train.checkpoints)
        self.checkpoint_record: dict = {}
        # set by the recipe for method: projector: writes a checkpoint's weights (the projector only)
        # in place of the whole model; resume then restores them itself (vlm.train.modes.resume_weights)
        self.save_weights = None
        # set by the recipe when it put a checkpoint's weights into the model before training
        # (method full / projector: vlm.train.modes.resume_weights); Trainer's own load is skipped
        self.weights_resumed = False
        # set by the recipe for method full/projector under FSDP2 (vlm.train.recipe: why): the
        # forward's autocast dtype, in place of accelerate's mixed precision
        self.autocast_dtype = None
        # set by the recipe under FSDP2: layer groups and replicated towers (vlm.train.fsdp_units.Layout)
        self.fsdp_layout = None
        # set by the recipe on CUDA: in which phase of the step the training peak was reached
        # (vlm.train.peak_phase)
        self.peak_phases = None
        self.run_before: dict = {}            # run totals of the checkpoint resumed from
        # set by the recipe with training.cuda_graphs: each micro-batch marked as a CUDA-graph step
        # and guarded by the narrow fallback (vlm.train.graph_steps)
        self.graph_steps = None
        self.segment_start = time.perf_counter()

    def steady_after(self) -> int:
        """This process's steady window starts after this optimizer step: ``STEADY_AFTER`` steps into
        this segment (a resumed run starts past 0), or the last step that compiled, if later."""
        segment_start = self.step_times[0][0] - 1 if self.step_times else 0
        return max(segment_start + STEADY_AFTER, max(self.compile_steps, default=0))

    def _read_counts(self) -> None:
        if self._pending_counts is not None:
            tokens, label_tokens = self._pending_counts.tolist()
            self._tokens_seen += tokens
            self._label_tokens_seen += label_tokens
            self._pending_counts = None

    @property
    def tokens_seen(self) -> int:
        self._read_counts()
        return self._tokens_seen

    @property
    def label_tokens_seen(self) -> int:
        self._read_counts()
        return self._label_tokens_seen

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from vlm.train.distributed import fsdp2_precision, fsdp_on_cpu

        fsdp_on_cpu(self)      # FSDP2 on CPU processes too (accelerate would run DDP there)
        fsdp2_precision(self)  # reduce in fp32, the loss as the model computes it (not bf16)

    def create_optimizer(self, model=None):
        # FSDP2: our layout's part (vlm.train.fsdp_units.Layout) before accelerate wraps the rest — and
        # after the optimizer exists: Trainer splits param groups by DTensor mesh, so an optimizer built
        # on half-sharded parameters would group them unlike one process (its checkpoint then would not
        # resume there). Built on plain parameters, it follows the sharding as accelerate's own switch
        # does (param_groups swapped to the sharded parameters).
        pending = (self.optimizer is None and self.fsdp_layout is not None and not self.fsdp_layout.applied
                   and getattr(self.accelerator, "is_fsdp2", False))
        optimizer = super().create_optimizer(model)
        if pending:
            self._apply_fsdp_layout()
        return optimizer

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # (an optimizer handed in: no create_optimizer call, the layout goes in here)
        if (self.fsdp_layout is not None and not self.fsdp_layout.applied
                and getattr(self.accelerator, "is_fsdp2", False) and self.optimizer is not None):
            self._apply_fsdp_layout()
        return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

    def _apply_fsdp_layout(self) -> None:
        """Shard by our layout and re-point the optimizer's param groups at the sharded parameters.

        The groups hold parameter *names* meanwhile: an optimizer holding the unsharded weights would
        keep each of them alive after its unit is sharded (method full: the whole model beside its
        shards), which is the load peak ``fsdp_units.shard_model`` exists to avoid."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        slots = []
        for group in self.optimizer.param_groups:
            slots.append([names.get(id(p), p) for p in group["params"]])
            group["params"] = []
        self.fsdp_layout.pre_wrap(self.model, self.accelerator)
        after = dict(self.model.named_parameters())
        for group, slot in zip(self.optimizer.param_groups, slots):
            group["params"] = [after[p] if isinstance(p, str) else p for p in slot]

    def _clip_grad_norm(self, model):
        # FSDP2: the norm from the local shards and one all-reduce (vlm.train.local_step), not
        # torch's clip over DTensors (host-side sharding propagation for every foreach op)
        if (getattr(self.accelerator, "is_fsdp2", False) and self.accelerator.scaler is None
                and not self._has_mixed_mesh_grads(model)):
            from vlm.train.local_step import clip_grad_norm_local

            return clip_grad_norm_local(model.parameters(), self.args.max_grad_norm,
                                        fallback=self.accelerator.clip_grad_norm_)
        return super()._clip_grad_norm(model)

    # -- resume from a checkpoint written under another strategy (vlm.train.cross_resume) --------
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from vlm.train import cross_resume

        if self.weights_resumed:
            return   # method full / projector: the recipe put the checkpoint's weights in before train()
        if not cross_resume.crosses(resume_from_checkpoint, self.is_fsdp_enabled):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        cross_resume.load_adapter(self.model if model is None else model, Path(resume_from_checkpoint))

    def _load_optimizer_and_scheduler(self, checkpoint):
        from vlm.train import cross_resume

        if checkpoint is None or not cross_resume.crosses(checkpoint, self.is_fsdp_enabled):
            return super()._load_optimizer_and_scheduler(checkpoint)
        cross_resume.load_optimizer(self.model, self.optimizer, Path(checkpoint))
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return super().get_batch_samples(_TimedBatches(epoch_iterator, self), num_batches, device)

    def _get_train_sampler(self, train_dataset=None):
        if self._train_sampler_factory is not None:
            return self._train_sampler_factory(self.args)
        return super()._get_train_sampler(train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.graph_steps is None:
            return super().training_step(model, inputs, num_items_in_batch)
        return self.graph_steps.run(lambda: super(VlmTrainer, self).training_step(model, inputs, num_items_in_batch))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._t0 is None:
            self._t0, self._tokens0 = time.perf_counter(), self.tokens_seen
            self.load_peak_bytes = self.peak_memory_bytes()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()   # from here on: the training peak
                if self.peak_phases is not None:
                    self.peak_phases.reset()
        ids = inputs.get("input_ids")
        if ids is not None:
            self.computed_tokens += ids.numel()
        mask, labels = inputs.get("attention_mask"), inputs.get("labels")
        if mask is not None or labels is not None:
            ref = mask if mask is not None else labels
            zero = ref.new_zeros((), dtype=torch.int64)
            counts = torch.stack([mask.sum() if mask is not None else zero,
                                  (labels[:, 1:] != -100).sum() if labels is not None else zero])
            self._pending_counts = counts if self._pending_counts is None else self._pending_counts + counts
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=self.args.device.type, dtype=self.autocast_dtype):
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
        else:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        if self.peak_phases is not None:   # from here: the loss's backward (cross-entropy, lm_head)
            self.peak_phases.mark("loss backward (cross-entropy, lm_head)")
        return out

    def log(self, logs, *args, **kwargs):
        """Adds ``tokens_per_s`` (non-padding tokens / wall second since the first step) and memory
        (``mem_gib``: peak CUDA allocated; ``rss_gib``: peak host RSS on CPU) to every log line."""
        if self._t0 is not None:
            self.train_seconds = time.perf_counter() - self._t0
            if self.train_seconds > 0:
                logs["tokens_per_s"] = round((self.tokens_seen - self._tokens0) / self.train_seconds, 1)
        steady = steady_rate(self.step_times, self.steady_after())
        if steady:
            logs["tokens_per_s_steady"] = round(steady, 1)
        key = "mem_gib" if torch.cuda.is_available() else "rss_gib"
        logs[key] = round(self.peak_memory_bytes() / 2**30, 3)
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        if self.save_weights is None or not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        # method: projector under FSDP2: every process gathers the projector, the main one writes it
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.save_weights(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.save_weights is None or not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # method: projector under FSDP2: Trainer would also write the frozen model's shards (the
        # whole base, every checkpoint); the projector is in projector.safetensors (save_model)
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _save(self, output_dir=None, state_dict=None):
        if self.save_weights is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if self.args.should_save:
            self.save_weights(output_dir)

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            begin_save(folder, self.state.global_step)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:  # a full disk surfaces from torch as "unexpected pos ...": name it
            full = space_error(run_dir, folder)
            if full is None:
                raise
            raise full from e
        totals = self.run_totals()  # a collective: every process is here
        if self.args.should_save:
            from vlm.train.distributed import write_meta

            write_meta(folder, self.args)
            mark_complete(folder, self.state.global_step, {**self.checkpoint_record, "run": totals})

    def run_totals(self) -> dict:
        """The run so far, over every process and every segment (``run_before``: the totals recorded
        in the checkpoint this segment resumed from)."""
        from vlm.train.distributed import sum_over_processes

        now = time.perf_counter()
        before = self.run_before
        return {"tokens": int(before.get("tokens", 0) + sum_over_processes(self, self.tokens_seen)),
                "label_tokens": int(before.get("label_tokens", 0)
                                    + sum_over_processes(self, self.label_tokens_seen)),
                "train_seconds": round(before.get("train_seconds", 0) + (now - self._t0 if self._t0 else 0.0), 3),
                "wall_seconds": round(before.get("wall_seconds", 0) + now - self.segment_start, 3),
                "segments": int(before.get("segments", 0)) + 1}

    def peak_memory_bytes(self) -> int:
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
        from vlm.train.metrics import peak_rss_bytes

        return peak_rss_bytes()


class _TimedBatches:
    """The epoch iterator, timing each ``next`` (the loop blocked on data: collation when there are
    no workers, else waiting for a worker's batch)."""

    def __init__(self, iterator, trainer: VlmTrainer):
        self.iterator, self.trainer = iterator, trainer

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.trainer.data_wait_seconds += time.perf_counter() - t


class _StepClock(TrainerCallback):
    def __init__(self, trainer: VlmTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # optimizer, scheduler, accelerate's prepare and the DataLoader are built by now
        if self.trainer.train_begin is None:
            self.trainer.train_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        tr = self.trainer
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if tr.first_step_end is None:
            tr.first_step_end = now
            tr.first_step_compile = compile_split()   # what compiling cost in the first step
            tr.first_step_data_wait = tr.data_wait_seconds   # ... and waiting for its batches
        if tr._t0 is not None:
            tr.step_times.append((state.global_step, round(now - tr._t0, 4), tr.tokens_seen - tr._tokens0,
                                  round(tr.data_wait_seconds, 4)))
        graphs = dynamo_graphs()
        if graphs != tr._graphs_seen:   # compiled in this step: the steady window starts after it
            tr._graphs_seen = graphs
            tr.compile_steps.append(state.global_step)
