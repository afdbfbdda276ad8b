import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from vlm.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference  # noqa: E402
from vlm.kernels.nf4_lora import nf4_lora_linear, nf4_lora_linear_reference  # noqa: E402

from kernel_testutil import DEVICE, assert_close  # noqa: E402


def _nf4_linear(n_in, n_out, nested, bias=False, dtype=torch.bfloat16):
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=dtype, compress_statistics=nested,
                            quant_type="nf4", quant_storage=torch.uint8)
    with torch.no_grad():
        lin.weight.data.normal_(0, 0.05)   # real-looking weights before quantization
    return lin.to(DEVICE)                  # .to(device) quantizes (bnb's own kernels)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("n_out,n_in", [(77, 246), (123, 128)])
def test_dequant_matches_bitsandbytes(n_out, n_in, nested):
    lin = _nf4_linear(n_in, n_out, nested)
    w, qs = lin.weight, lin.weight.quant_state
    assert qs.blocksize == 64 and bool(qs.nested) == nested
    ref = bnb.functional.dequantize_4bit(w.data, qs).float()
    out = dequantize_nf4(w.data, qs, dtype=torch.float32)
    assert_close(out, ref, torch.float32, "deq vs bnb")
    assert_close(dequantize_nf4_reference(w.data, qs, torch.float32), ref, torch.float32, "torch ref")
    # bf16 out, written into a wider buffer whose tail must stay untouched
    buf = torch.full((n_out, n_in + 5), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    dequantize_nf4(w.data, qs, out=buf[:, :n_in])
    assert torch.isnan(buf[:, n_in:]).all()
    assert_close(buf[:, :n_in], ref, torch.bfloat16, "deq bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [False, True])
def test_nf4_lora_forward_backward(dtype, dropout):
    M, K, N, r, s = 5 * 23, 128, 123, 8, 2.0
    lin = _nf4_linear(K, N, nested=True, bias=True)
    w, qs = lin.weight, lin.weight.quant_state
    x = torch.randn(5, 23, K, device=DEVICE, dtype=dtype).requires_grad_(True)
    A = (torch.randn(r, K, device=DEVICE) * 0.1).to(dtype).requires_grad_(True)
    B = (torch.randn(N, r, device=DEVICE) * 0.1).to(dtype).requires_grad_(True)
    bias = lin.bias.detach().to(dtype)
    mask = (torch.rand_like(x) > 0.3).to(dtype) / 0.7 if dropout else None
    xl = x * mask if dropout else None
    y = nf4_lora_linear(x, w.data, qs, A, B, s, bias=bias, x_lora=xl)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().double().requires_grad_(True)
    Ar = A.detach().double().requires_grad_(True)
    Br = B.detach().double().requires_grad_(True)
    yr = nf4_lora_linear_reference(xr, w.data, qs, Ar, Br, s, bias=bias.double(),
                                   x_lora=xr * mask.double() if dropout else None)
    yr.backward(dy.double())
    assert y.shape == (5, 23, N) and M == 115
    assert_close(y, yr, dtype, "y")
    assert_close(x.grad, xr.grad, dtype, "dx")
    assert_close(A.grad, Ar.grad, dtype, "dA")
    assert_close(B.grad, Br.grad, dtype, "dB")


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(3584, 18944), (1536, 8960)])
def test_nf4_lora_full(K, N):
    lin = _nf4_linear(K, N, nested=True)
    w, qs = lin.weight, lin.weight.quant_state
    ref = bnb.functional.dequantize_4bit(w.data, qs).float()
    assert_close(dequantize_nf4(w.data, qs, dtype=torch.float32), ref, torch.float32, "deq")
    x = torch.randn(4096, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(16, K, device=DEVICE) * 0.02).to(torch.bfloat16).requires_grad_(True)
    B = (torch.randn(N, 16, device=DEVICE) * 0.02).to(torch.bfloat16).requires_grad_(True)
    y = nf4_lora_linear(x, w.data, qs, A, B, 2.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, Ar, Br = (t.detach().float().requires_grad_(True) for t in (x, A, B))
    yr = nf4_lora_linear_reference(xr, w.data, qs, Ar, Br, 2.0)
    yr.backward(dy.float())
    assert_close(y, yr, torch.bfloat16, "y")
    assert_close(x.grad, xr.grad, torch.bfloat16, "dx")
    assert_close(A.grad, Ar.grad, torch.bfloat16, "dA")
    assert_close(B.grad, Br.grad, torch.bfloat16, "dB")
