import pytest
import torch

from vlm.kernels.rms_norm import TritonRMSNorm, rms_norm, rms_norm_reference

from kernel_testutil import DEVICE, assert_close

CPU_SHAPES = [(5, 123, 123), (7, 64), (1, 3, 1000)]
GPU_SHAPES = [(4096, 1536), (16384, 3584), (3, 1000, 123)]


def _check(shape, dtype, eps=1e-6, offset=0.0):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3 + 0.5
    w = (torch.randn(shape[-1], device=DEVICE) * 0.2 + 1 - offset).to(dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = rms_norm(x, w, eps, offset)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    yr = rms_norm_reference(xr, wr, eps, offset)
    yr.backward(dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(x.grad, xr.grad, dtype, "dx")
    assert_close(w.grad, wr.grad, dtype, "dw")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_rms_norm_small(shape, dtype):
    _check(shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_rms_norm_full(shape, dtype):
    _check(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gemma_offset(dtype):
    """Gemma's (1 + w) norm: weights near 0 (stored as w − 1), forward and backward."""
    _check((5, 123, 123), dtype, offset=1.0)


def test_gemma_offset_matches_transformers_gemma3_norm():
    """The offset kernel against transformers' own Gemma3RMSNorm module (its code, not our reading)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    hf = Gemma3RMSNorm(96, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        hf.weight.normal_(0, 0.3)
    ours = TritonRMSNorm.from_module(hf, offset=1.0)
    x = torch.randn(4, 17, 96, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    dy = torch.randn(4, 17, 96, device=DEVICE)
    hf(x).backward(dy)
    grad_hf = hf.weight.grad.clone()
    ours(x2).backward(dy)
    assert (ours(x2) - hf(x)).abs().max().item() < 1e-5
    assert (x2.grad - x.grad).abs().max().item() < 1e-5
    assert (hf.weight.grad - 2 * grad_hf).abs().max().item() < 1e-4   # both added into one Parameter


def test_module_matches_hf_and_keeps_weight():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        hf.weight.normal_(1.0, 0.3)
    mod = TritonRMSNorm.from_module(hf)
    assert mod.weight is hf.weight and mod.variance_epsilon == 1e-5
    x = torch.randn(3, 17, 96, device=DEVICE)
    assert_close(mod(x), hf(x), torch.float32, "module")
