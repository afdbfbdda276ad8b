"""vlm.train.graph_steps: the CUDA-graph step mark and the narrow fallback of `training.cuda_graphs`.

The liveness error itself needs a GPU (tests/vlm/train/test_cuda_graphs_gpu.py,
benchmarks/cuda_graphs_repro.py). Here the fallback's own work is checked on CPU with torch's exact
error raised by the step in place of the CUDA-graph replay: the micro-batch runs again from clean
gradients and counters, the layers are recompiled without CUDA graphs, any other error passes
through untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

TORCH_MESSAGE = ("TODO: graph recording observed an input tensor deallocate during graph  recording that did "
                 "not occur during replay. Please file an issue.")


def _trainer(tmp_path, model, grad_accum=1):
    from transformers import TrainingArguments

    from vlm.train.trainer import VlmTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             gradient_accumulation_steps=grad_accum)
    return VlmTrainer(model=model, args=args)


def _step(model, trainer, x, fail_once: list):
    """A micro-batch as Trainer.training_step runs it: compute_loss counts tokens, backward
    accumulates gradients; the first call then fails as a CUDA-graph replay in backward does."""
    trainer.computed_tokens += x.shape[0]
    loss = model(x).pow(2).mean()
    loss.backward()
    if fail_once:
        fail_once.pop()
        raise RuntimeError(TORCH_MESSAGE)
    return loss.detach()


def test_fallback_runs_the_micro_batch_again_without_graphs(tmp_path, capsys):
    from vlm.train.graph_steps import GraphSteps, marks_seen

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    trainer = _trainer(tmp_path, model)
    recompiled = []
    steps = GraphSteps(trainer, model, family=None, recompile=lambda: recompiled.append(1) or 2)
    x = torch.randn(5, 4)
    marks = marks_seen()
    fail_once = [True]
    loss = steps.run(lambda: _step(model, trainer, x, fail_once))
    assert marks_seen() == marks + 1          # the micro-batch began with torch's step mark
    assert recompiled == [1] and steps.graphs_on is False
    assert steps.fallback["step"] == 1 and steps.fallback["recompiled_layers"] == 2
    assert "graph recording observed an input tensor deallocate" in steps.fallback["error"]
    assert "pytorch/pytorch#154306" in capsys.readouterr().out
    # the failed attempt left nothing behind: the gradients and counts of exactly one micro-batch
    ref = nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    ref_loss = ref(x).pow(2).mean()
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item())
    assert torch.equal(model.weight.grad, ref.weight.grad) and torch.equal(model.bias.grad, ref.bias.grad)
    assert trainer.computed_tokens == 5
    # later micro-batches: no mark, no guard (the layers no longer replay graphs)
    steps.run(lambda: _step(model, trainer, x, fail_once=[]))
    assert marks_seen() == marks + 1


def test_other_errors_and_accumulated_gradients_are_not_swallowed(tmp_path):
    from vlm.train.graph_steps import GraphSteps

    model = nn.Linear(4, 3)
    trainer = _trainer(tmp_path, model, grad_accum=2)
    steps = GraphSteps(trainer, model, family=None, recompile=lambda: pytest.fail("must not recompile"))

    def other():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        steps.run(other)
    assert steps.fallback is None and steps.graphs_on
    # a second micro-batch of one optimizer step fails: the first one's gradients are mixed in
    x = torch.randn(5, 4)
    model.zero_grad()
    steps.run(lambda: _step(model, trainer, x, fail_once=[]))
    fail_once = [True]
    with pytest.raises(RuntimeError, match="cuda_graphs: false") as e:
        steps.run(lambda: _step(model, trainer, x, fail_once))
    assert "grad_accum 2" in str(e.value) and steps.fallback is None


def test_accumulated_gradients_live_in_buffers_allocated_before_the_backward(tmp_path):
    """grad_accum > 1: the micro-batch's backward must add into .grad buffers allocated outside the
    CUDA graphs (vlm.train.graph_steps.stable_grads), not keep the backward's output as .grad."""
    from vlm.train.graph_steps import GraphSteps

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    seen = []

    def step(x):
        seen.append([p.grad is not None and not p.grad.any() for p in model.parameters()])
        return _step(model, trainer, x, [])

    for accum, expect in ((1, [False, False]), (2, [True, True])):
        model.zero_grad()
        trainer = _trainer(tmp_path, model, grad_accum=accum)
        steps = GraphSteps(trainer, model, family=None, recompile=lambda: 0)
        xs = [torch.randn(5, 4), torch.randn(5, 4)]
        for x in xs:
            steps.run(lambda x=x: step(x))
        assert seen[-2] == expect    # zero buffers present when the first micro-batch's backward ran
        ref = nn.Linear(4, 3)
        ref.load_state_dict(model.state_dict())
        sum(ref(x).pow(2).mean() for x in xs).backward()
        assert torch.allclose(model.weight.grad, ref.weight.grad) and torch.allclose(model.bias.grad, ref.bias.grad)


def test_drop_cuda_graphs_recompiles_the_layers_without_them(tiny_checkpoint):
    import vlm
    from vlm.lora import apply_lora
    from vlm.train.compile import compile_language_layers, drop_cuda_graphs, language_layers, layers_replay_cuda_graphs

    model, _ = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="fp32", device="cpu")
    family = model.vlm_family
    model = apply_lora(model, family, r=4, alpha=8, gradient_checkpointing=True, warn=False)
    assert compile_language_layers(model, family, mode="reduce-overhead") == 2
    assert layers_replay_cuda_graphs(model, family)
    assert drop_cuda_graphs(model, family) == 2
    assert not layers_replay_cuda_graphs(model, family)
    for layer in language_layers(model, family):   # still compiled, checkpoint still inside the call
        assert layer._compiled_call_impl is not None and "_vlm_uncheckpointed_forward" in layer.__dict__
        assert layer.gradient_checkpointing is False
