import pytest
import torch

from vlm.kernels.fused_linear_cross_entropy import (default_chunk_rows, fused_linear_cross_entropy,
                                                    fused_linear_cross_entropy_reference)

from kernel_testutil import DEVICE, TOL, assert_close, rel_err


def _check(N, H, V, dtype, chunk_rows=None, bias=False, weight_grad=True, num_items=None,
           ignore_frac=0.2, scale=2.0, softcap=None):
    h = torch.randn(N, H, device=DEVICE, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, H, device=DEVICE) / H ** 0.5 * 2).to(dtype).requires_grad_(weight_grad)
    b = torch.randn(V, device=DEVICE, dtype=dtype).requires_grad_(True) if bias else None
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.rand(N, device=DEVICE) < ignore_frac] = -100
    loss = fused_linear_cross_entropy(h, w, labels, bias=b, num_items=num_items, chunk_rows=chunk_rows,
                                      softcap=softcap)
    (loss * scale).backward()
    hr = h.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(weight_grad)
    br = b.detach().double().requires_grad_(True) if bias else None
    ref = fused_linear_cross_entropy_reference(hr, wr, labels, bias=br, num_items=num_items,
                                               softcap=softcap)
    (ref * scale).backward()
    # the logits are rounded to the input dtype (as HF's lm_head output is): the loss error is that
    # rounding averaged over rows
    assert abs(loss.item() - ref.item()) <= TOL[dtype] * abs(ref.item()) + 1e-6, (loss.item(), ref.item())
    assert_close(h.grad, hr.grad, dtype, "dh", factor=1.5)
    if weight_grad:
        assert_close(w.grad, wr.grad, dtype, "dW", factor=1.5)
    else:
        assert w.grad is None
    if bias:
        assert_close(b.grad, br.grad, dtype, "db", factor=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,V,chunk", [(5 * 41, 123, 1237, 100), (37, 64, 3000, None)])
def test_fused_ce_small(N, H, V, chunk, dtype):
    _check(N, H, V, dtype, chunk_rows=chunk)


def test_fused_ce_bias_frozen_weight_num_items():
    _check(130, 48, 517, torch.float32, chunk_rows=64, bias=True, weight_grad=False, num_items=211)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_logit_softcap(dtype):
    """c·tanh(z/c) before the CE (Gemma's final_logit_softcapping), with a cap the logits exceed
    (scale 6: |z| reaches ~20 > c = 5), so the tanh's derivative matters in every gradient."""
    _check(130, 48, 517, dtype, chunk_rows=64, bias=True, softcap=5.0, scale=6.0)


def test_fused_ce_softcap_changes_the_loss():
    h = torch.randn(64, 32, device=DEVICE) * 3
    w = torch.randn(100, 32, device=DEVICE)
    lab = torch.randint(0, 100, (64,), device=DEVICE)
    capped = fused_linear_cross_entropy(h, w, lab, softcap=2.0).item()
    plain = fused_linear_cross_entropy(h, w, lab).item()
    assert abs(capped - plain) > 0.1 * plain


def test_fused_ce_all_ignored_is_zero_not_nan():
    h = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    loss = fused_linear_cross_entropy(h, w, torch.full((9,), -100, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum().item() == 0.0 and w.grad.abs().sum().item() == 0.0


def test_fused_ce_chunking_does_not_change_result():
    h = torch.randn(200, 32, device=DEVICE)
    w = torch.randn(300, 32, device=DEVICE)
    lab = torch.randint(0, 300, (200,), device=DEVICE)
    a = fused_linear_cross_entropy(h, w, lab, chunk_rows=7)
    b = fused_linear_cross_entropy(h, w, lab, chunk_rows=200)
    assert rel_err(a, b) < 1e-6


def test_default_chunk_is_a_sixteenth():
    assert default_chunk_rows(16384, 151936) == 1024
    assert default_chunk_rows(4096, 151936) == 256
    assert default_chunk_rows(100, 151936) == 100


@pytest.mark.gpu
@pytest.mark.parametrize("N,H", [(4096, 1536), (8192, 3584)])
def test_fused_ce_full_vocab(N, H):
    _check(N, H, 151936, torch.bfloat16)


@pytest.mark.gpu
def test_fused_ce_peak_memory_is_an_eighth_of_logits():
    N, H, V = 8192, 1536, 151936
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device="cuda") / H ** 0.5).to(torch.bfloat16)
    lab = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_linear_cross_entropy(h, w, lab)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - h.grad.numel() * 2
    full_logits = N * V * 2
    assert extra <= full_logits / 8, (extra, full_logits)


@pytest.mark.parametrize("num_items", [None, "tensor", 37])
def test_fused_ce_reads_nothing_back(monkeypatch, num_items):
    """Forward and backward of the fused CE make no host read of a device value (the label count
    and the incoming gradient stay on the device; before: one ``.item()`` each per micro-batch).
    Everything but the Triton launch runs on the probe's emulated device; the launch runs the real
    kernel on the tensors' values (in place, as on a GPU)."""
    from vlm.kernels import fused_linear_cross_entropy as fce
    from vlm.train.host_read_probe import HostReadProbe

    launch = fce._ce_launch
    monkeypatch.setattr(fce, "_ce_launch", lambda z, lab, rows, ignore, inv, cap=None: launch(
        z.values, lab.values, rows.values, ignore, getattr(inv, "values", inv), cap))
    torch.manual_seed(0)
    h = torch.randn(2, 12, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    lab = torch.randint(0, 40, (2, 12))
    lab[0, :3] = -100
    items = torch.tensor(21) if num_items == "tensor" else num_items
    ref = fce.fused_linear_cross_entropy_reference(h, w, lab, num_items=items)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    with HostReadProbe() as probe:
        hp, wp = (torch.nn.Parameter(t) for t in probe.to_device((h.detach(), w.detach())))
        loss = fce.fused_linear_cross_entropy(hp, wp, probe.to_device(lab), num_items=probe.to_device(items), chunk_rows=8)
        loss.backward()
        got = HostReadProbe.to_host((loss.detach(), hp.grad, wp.grad))
    assert probe.count == 0, probe.report()
    torch.testing.assert_close(got[0], ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], ref_w, rtol=1e-4, atol=1e-6)
