import pytest
import torch

from vlm.kernels.swiglu import swiglu, swiglu_reference

from kernel_testutil import DEVICE, assert_close


def _check(shape, dtype):
    g = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_(True)
    u = torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(True)
    y = swiglu(g, u)
    dy = torch.randn_like(y)
    y.backward(dy)
    gr = g.detach().double().requires_grad_(True)
    ur = u.detach().double().requires_grad_(True)
    yr = swiglu_reference(gr, ur)
    yr.backward(dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(g.grad, gr.grad, dtype, "dg")
    assert_close(u.grad, ur.grad, dtype, "du")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 123, 123), (1, 7)])
def test_swiglu_small(shape, dtype):
    _check(shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 8960), (16384, 18944), (5, 123, 123)])
def test_swiglu_full(shape, dtype):
    _check(shape, dtype)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        swiglu(torch.randn(3, 4, device=DEVICE), torch.randn(3, 5, device=DEVICE))
