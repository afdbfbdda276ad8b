"""vlm.train.peak_phase: the phase in which a rising peak counter last rose is the one reported.

The real counter (``torch.cuda.max_memory_allocated``) needs a GPU; here the counter is a running
maximum that the modules' own forward and backward raise, so the test knows where the peak is."""

from __future__ import annotations

import torch

from vlm.train.peak_phase import PeakPhases


class _Counter:
    def __init__(self):
        self.max = 0

    def post(self, n: int) -> None:
        self.max = max(self.max, n)


class _Raise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counter, forward_bytes, backward_bytes):
        counter.post(forward_bytes)
        ctx.counter, ctx.backward_bytes = counter, backward_bytes
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.post(ctx.backward_bytes)
        return grad, None, None, None


class _Layer(torch.nn.Module):
    def __init__(self, counter, forward_bytes, backward_bytes):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.counter, self.fb, self.bb = counter, forward_bytes, backward_bytes

    def forward(self, x):
        return _Raise.apply(self.lin(x), self.counter, self.fb, self.bb)


def _run(sizes):
    counter = _Counter()
    layers = {f"layer {i}": _Layer(counter, f, b) for i, (f, b) in enumerate(sizes)}
    tracker = PeakPhases(read=lambda: counter.max)
    tracker.watch(layers)
    x = torch.randn(2, 4)
    for layer in layers.values():
        x = layer(x)
    tracker.mark("loss backward (cross-entropy, lm_head)")
    x.sum().backward()
    tracker.optimizer_step()
    return tracker.report()


def test_the_phase_that_raised_the_peak_last_is_reported():
    assert _run([(10, 1), (50, 1), (20, 1)]) == {"phase": "layer 1 forward", "bytes": 50}
    # the backward of layer 1 runs from its output's gradient to layer 0's: the peak is there
    assert _run([(10, 1), (20, 5), (30, 90)]) == {"phase": "layer 2 backward", "bytes": 90}
    assert _run([(10, 70), (20, 5), (30, 9)]) == {"phase": "layer 0 backward", "bytes": 70}


def test_reset_starts_the_training_peak_over():
    counter = _Counter()
    tracker = PeakPhases(read=lambda: counter.max)
    counter.post(100)
    tracker.mark("optimizer step")
    tracker.reset()
    counter.max = 0   # the trainer reset the allocator's peak
    counter.post(30)
    assert tracker.report() == {"phase": "optimizer step", "bytes": 30}
