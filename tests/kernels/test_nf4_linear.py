"""vlm::nf4_linear: y = x·deq(W)ᵀ as one custom op whose backward never keeps deq(W)."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from vlm.kernels.nf4 import dequantize_nf4_reference  # noqa: E402
from vlm.kernels.nf4_linear import attach_nf4_state, bnb_linear4bit_forward, nf4_linear  # noqa: E402

from kernel_testutil import DEVICE, assert_close  # noqa: E402


def _linear4bit(n_in, n_out, nested, bias=False):
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=torch.float32, compress_statistics=nested,
                            quant_type="nf4", quant_storage=torch.uint8)
    with torch.no_grad():
        lin.weight.data.normal_(0, 0.05)
        if bias:
            lin.bias.data.normal_(0, 0.1)
    return lin.to(DEVICE)


@pytest.mark.parametrize("nested", [True, False])
def test_forward_backward_match_the_dequantized_linear(nested):
    lin = _linear4bit(128, 77, nested, bias=True)
    w, qs = lin.weight, lin.weight.quant_state
    x = torch.randn(3, 5, 128, device=DEVICE, requires_grad=True)
    y = nf4_linear(x, w.data, qs, lin.bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    wr = dequantize_nf4_reference(w.data, qs, torch.float64)
    xr = x.detach().double().requires_grad_(True)
    yr = torch.nn.functional.linear(xr, wr, lin.bias.double())
    yr.backward(dy.double())
    assert y.shape == (3, 5, 77)
    assert_close(y, yr, torch.float32, "y")
    assert_close(x.grad, xr.grad, torch.float32, "dx")


def test_backward_saves_no_dequantized_weight():
    """The memory property: among the tensors autograd saves, none is an (N, K) float weight."""
    lin = _linear4bit(128, 96, nested=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(4, 128, device=DEVICE, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4_linear(x, lin.weight.data, lin.weight.quant_state)
    assert saved, "the op saved nothing: its backward could not run"
    assert not any(shape == (96, 128) and dtype.is_floating_point for shape, dtype in saved), saved
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_opcheck():
    lin = _linear4bit(64, 40, nested=True)
    from vlm.kernels.nf4 import state_parts

    code, absmax, code2, absmax2, bs2, offset, nested = state_parts(lin.weight.quant_state)
    x = torch.randn(6, 64, device=DEVICE, requires_grad=True)
    args = (x, lin.weight.data.reshape(-1), code, absmax, code2, absmax2, offset, 40, 64, 64, bs2, nested)
    torch.library.opcheck(torch.ops.vlm.nf4_linear.default, args)


def test_compiles_without_graph_break():
    torch._dynamo.reset()
    layers = [_linear4bit(64, 48, nested=True) for _ in range(3)]
    for lay in layers:
        attach_nf4_state(lay)

    def f(x):
        for lay in layers:
            x = torch.nn.functional.pad(bnb_linear4bit_forward(lay, x), (0, 16))
        return x

    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    eager = f(x)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x)   # fullgraph: a break raises
    assert_close(compiled, eager, torch.float32, "compiled")
    compiled.sum().backward()
    assert x.grad is not None
