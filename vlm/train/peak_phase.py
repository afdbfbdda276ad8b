"""Where in the step the training peak was reached: which unit's forward, recompute or backward,
the optimizer step, or the step's end (logging, checkpoint save).

FSDP2's peak is the sharded parameters plus whatever is gathered or alive at one moment (a whole
vision tower in its forward, the lm_head at the loss, a decoder layer and the prefetched next one
in backward); which moment wins decides which layout knob can lower it. The peak counter
(``torch.cuda.max_memory_allocated``) only ever rises, so reading it at each phase boundary says
in which phase it last rose: that phase holds the peak. One host read of the allocator's counters
per boundary (no GPU sync): ~3 per decoder layer per step.

Phases: ``<module> forward`` (its forward pre-hook), ``<module> recompute`` (a forward again after
the loss: gradient checkpointing), ``<module> backward`` (a hook on its output's gradient: from
there until the next boundary), ``loss backward`` (from the loss's return: its backward through
cross-entropy and the lm_head), ``optimizer step`` and ``step end`` (Trainer callbacks). Eager runs
only (``vlm.train.recipe``): a hook inside a compiled layer would break its graph."""

from __future__ import annotations

from typing import Callable

import torch


class PeakPhases:
    def __init__(self, read: Callable[[], int] | None = None):
        self.read = read or torch.cuda.max_memory_allocated
        self.phase = "before the first step"
        self.last = 0
        self.peak_phase: str | None = None
        self.peak_bytes = 0
        self.after_loss = False
        self.handles: list = []

    def reset(self) -> None:
        """The training peak starts here (the trainer reset the counter)."""
        self.last, self.peak_phase, self.peak_bytes = 0, None, 0

    def mark(self, phase: str) -> None:
        now = int(self.read())
        if now > self.last:
            self.last, self.peak_phase, self.peak_bytes = now, self.phase, now
        self.phase = phase

    def watch(self, modules: dict[str, torch.nn.Module]) -> None:
        """Boundaries at each module's forward (or recompute) and at its output's gradient."""
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            self.mark(f"{name} {'recompute' if self.after_loss else 'forward'}")
        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.mark(f"after {name} {'recompute' if self.after_loss else 'forward'}")
            out = output if isinstance(output, torch.Tensor) else next(
                (t for t in (output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list))
                             else ()) if isinstance(t, torch.Tensor)), None)
            if out is not None and out.requires_grad and torch.is_grad_enabled():
                out.register_hook(lambda grad: self._backward(name))
        return hook

    def _backward(self, name):
        self.after_loss = True
        self.mark(f"{name} backward")

    def optimizer_step(self) -> None:
        self.mark("optimizer step")
        self.after_loss = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def report(self) -> dict | None:
        self.mark(self.phase)   # closes the phase running now
        if self.peak_phase is None:
            return None
        return {"phase": self.peak_phase, "bytes": self.peak_bytes}


def watched_modules(model, family) -> dict[str, torch.nn.Module]:
    """The modules whose phases are told apart: the input embeddings, each vision tower (and its
    blocks when they are FSDP units), each decoder layer, the lm_head."""
    from torch.distributed.fsdp import FSDPModule

    from vlm.train.compile import language_layers, vision_blocks

    out: dict[str, torch.nn.Module] = {}
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    if embed is not None:
        out["input embeddings"] = embed
    for i, (_, tower) in enumerate(family.component_roots(model, "vision")):
        out[f"vision tower{'' if i == 0 else f' {i}'}"] = tower
    if family.vision_blocks:
        for i, block in enumerate(vision_blocks(model, family)):
            if isinstance(block, FSDPModule):
                out[f"vision block {i}"] = block
    try:
        for i, layer in enumerate(language_layers(model, family)):
            out[f"decoder layer {i}"] = layer
    except ValueError:
        pass
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None:
        out["lm_head"] = head
    return out


def callback(tracker: PeakPhases, family):
    """The Trainer's side: the modules are watched once the model is wrapped (FSDP units known), and
    the optimizer step and the step's end (logging, checkpoint save) are phases of their own."""
    from transformers import TrainerCallback

    class PeakPhaseMarks(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and not tracker.handles:
                tracker.watch(watched_modules(model, family))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            tracker.optimizer_step()

        def on_optimizer_step(self, args, state, control, **kwargs):
            tracker.mark("after the optimizer step")

        def on_step_end(self, args, state, control, **kwargs):
            tracker.mark("step end (logging, checkpoint save)")

    return PeakPhaseMarks()
