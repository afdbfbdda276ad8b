import pytest
import torch

from vlm.kernels.geglu import geglu, geglu_reference, is_geglu_mlp

from kernel_testutil import DEVICE, assert_close


def _check(shape, dtype):
    g = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_(True)
    u = torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(True)
    y = geglu(g, u)
    dy = torch.randn_like(y)
    y.backward(dy)
    gr = g.detach().double().requires_grad_(True)
    ur = u.detach().double().requires_grad_(True)
    yr = geglu_reference(gr, ur)   # torch's tanh-GELU, autograd gives the reference gradients
    yr.backward(dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(g.grad, gr.grad, dtype, "dg")
    assert_close(u.grad, ur.grad, dtype, "du")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 123, 123), (1, 7)])
def test_geglu_small(shape, dtype):
    _check(shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 10240), (8192, 15360), (5, 123, 123)])
def test_geglu_full(shape, dtype):
    _check(shape, dtype)


def test_geglu_is_not_exact_gelu():
    """The kernel is the tanh approximation Gemma uses, distinguishable from the erf GELU."""
    g = torch.linspace(-4, 4, 257, device=DEVICE)
    u = torch.ones_like(g)
    y = geglu(g, u).double()
    erf = torch.nn.functional.gelu(g.double())
    tanh = torch.nn.functional.gelu(g.double(), approximate="tanh")
    assert (y - tanh).abs().max() < 1e-6 < (y - erf).abs().max()


def test_gemma3_mlp_is_recognised_and_silu_mlps_are_not():
    from transformers import Gemma3TextConfig, LlamaConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    gemma = Gemma3MLP(Gemma3TextConfig(hidden_size=32, intermediate_size=64))
    llama = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64))
    assert is_geglu_mlp(gemma) and not is_geglu_mlp(llama)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        geglu(torch.randn(3, 4, device=DEVICE), torch.randn(3, 5, device=DEVICE))
