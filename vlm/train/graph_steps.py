"""Training steps over CUDA-graphed layers (``training.cuda_graphs``): step boundaries and a fallback.

    GraphSteps(trainer, model, family).run(step_fn)   one micro-batch: marked, guarded

**Step boundaries.** torch's CUDA-graph trees record one path of graphs (layer 0 forward, …, layer N
backward) and replay it; each graph's outputs live in one memory pool and are overwritten by the
next replay of the path. Where a new iteration begins decides which tensors the tree keeps alive
and which it may overwrite. Without being told, torch guesses it: a call of any compiled function
(each decoder layer, each frozen vision block, BF16AdamW's compiled update) starts a new
"generation" unless a forward is waiting for its backward. ``torch.compiler.cudagraph_mark_step_begin``
is torch's explicit form for training loops: here it is called once before each micro-batch's
forward, so the whole forward + backward of a micro-batch is one generation, whatever else is
compiled in the process.

**Gradient accumulation.** With ``grad_accum`` > 1 each micro-batch after the first is a new
generation, and the gradients summed so far must not live in the CUDA-graph pool (``stable_grads``).

**Fallback (a safety net, not the fix).** cudagraph trees raise ``RuntimeError: TODO: graph recording
observed an input tensor deallocate during graph recording that did not occur during replay`` when
an input of a graph (an output of an earlier graph: a layer's hidden states, a tensor saved for
backward) died while the graph was recorded but is still referenced when it is replayed. It was
seen at step 3 (the first replay) of `vlm train` on an H200 (torch 2.11, transformers 5.17;
pytorch/pytorch#154306: same message where a non-reentrant checkpoint keeps a graph output alive
across replay). Should it happen, the micro-batch's partial gradients are dropped, the language
layers are compiled again without CUDA graphs (``vlm.train.compile.drop_cuda_graphs``) and the same
micro-batch runs again: the run continues compiled, slower, with a warning that names the cause,
and ``summary.json`` records it (``cuda_graphs_fallback``). Only this exact error is caught; with
gradients accumulated from earlier micro-batches of the same optimizer step (grad_accum > 1) they
cannot be separated from the failed one's, so the error is raised with that explanation instead.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# the message of cudagraph trees' liveness check (torch/_inductor/cudagraph_trees.py, check_invariants)
LIVENESS_ERROR = "graph recording observed an input tensor deallocate during graph"


def is_liveness_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and LIVENESS_ERROR in str(error)


def mark_step_begin() -> None:
    """torch's explicit new-iteration mark for CUDA-graph trees (module doc)."""
    torch.compiler.cudagraph_mark_step_begin()


def marks_seen() -> int | None:
    """How many step marks torch's CUDA-graph trees have received in this process (torch's own
    counter, counting down from 0); None where this torch keeps none."""
    try:
        from torch._inductor.cudagraph_trees import MarkStepBox
    except ImportError:   # pragma: no cover
        return None
    return -int(MarkStepBox.mark_step_counter)


def stable_grads(params) -> int:
    """Give every parameter without a gradient a zero one, allocated here (outside any CUDA graph);
    returns how many.

    Why, with grad_accum > 1: a parameter's first gradient of a step is otherwise the backward
    graph's output tensor itself (autograd keeps it as ``.grad`` instead of copying), memory of the
    CUDA-graph pool, which the next micro-batch's replay overwrites while ``.grad`` still holds the
    sum so far (torch then refuses the access: "accessing gradient tensor output of CUDAGraphs that
    has been overwritten"). Into a buffer of its own, autograd adds each micro-batch's gradient in
    place and the graph's output dies with the backward. One optimizer step's gradients are then
    exactly the same sum; one zero fill per step."""
    n = 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
            n += 1
    return n


class GraphSteps:
    """One micro-batch at a time: ``run(step_fn)`` marks the step, runs it and, on the liveness
    error only, falls back to compiled layers without CUDA graphs and runs it again."""

    def __init__(self, trainer, model, family, *, recompile: Callable[[], int] | None = None):
        self.trainer, self.model, self.family = trainer, model, family
        self.graphs_on = True
        self.marks = 0                  # micro-batches begun with torch's step mark
        self.fallback: dict | None = None   # why and when CUDA graphs were dropped (summary.json)
        self._recompile = recompile or self._drop_graphs
        self._trainable = None          # the trainable parameters, listed on the first micro-batch

    def _drop_graphs(self) -> int:
        from vlm.train.compile import drop_cuda_graphs

        return drop_cuda_graphs(self.model, self.family)

    def run(self, step_fn: Callable[[], Any]) -> Any:
        if not self.graphs_on:
            return step_fn()
        mark_step_begin()
        self.marks += 1
        tr = self.trainer
        if self._trainable is None:
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        trainable = self._trainable
        grads_before = any(p.grad is not None for p in trainable)
        if tr.args.gradient_accumulation_steps > 1:
            stable_grads(trainable)
        counts = (tr._pending_counts, tr.computed_tokens)   # compute_loss adds this micro-batch's
        try:
            return step_fn()
        except RuntimeError as e:
            if not is_liveness_error(e):
                raise
            if grads_before:
                raise RuntimeError(
                    f"training.cuda_graphs: CUDA-graph replay failed at optimizer step "
                    f"{tr.state.global_step + 1} after earlier micro-batches of the step had accumulated "
                    f"gradients (grad_accum {tr.args.gradient_accumulation_steps}), so the step cannot be "
                    f"run again without them; set training.cuda_graphs: false. torch said: {e}") from e
            error = str(e)
        # out of the except block: the failed step's frames (and the graph outputs they hold) are gone
        # before the CUDA-graph trees are shut down
        self._fall_back(error)
        tr._pending_counts, tr.computed_tokens = counts
        for p in self.model.parameters():   # the failed backward's partial gradients
            p.grad = None
        return step_fn()

    def _fall_back(self, error: str) -> None:
        import gc

        step = self.trainer.state.global_step + 1
        gc.collect()
        n = self._recompile()
        self.graphs_on = False
        self.fallback = {"step": step, "error": error.strip()[:300], "recompiled_layers": n}
        print(f"warning: training.cuda_graphs: CUDA-graph replay of the compiled layers failed at step "
              f"{step} (torch's cudagraph trees: an input of a recorded graph died while it was recorded "
              "but is still referenced at replay; pytorch/pytorch#154306). Continuing with compiled layers "
              f"without CUDA graphs ({n} layers recompiled; this step runs again). The speed of "
              "cuda_graphs is lost, not the result; summary.json: cuda_graphs_fallback")
