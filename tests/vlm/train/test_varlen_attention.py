"""Varlen attention over packed rows equals masked attention over the whole row.

The reference is written independently here: the dense (T × T) mask ``causal ∧ same segment``
(∧ inside the sliding window), one SDPA over all tokens with grouped-query heads expanded. The CPU
path (one SDPA per segment) must match it; on a GPU the flash varlen kernel must match it in
forward and backward, with padded empty segments, and compile into a graph without breaks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlm.data_formats.segments import max_segment_length, padded_boundaries, segment_boundaries
from vlm.train.varlen_attention import reference_varlen, varlen_attention


def _dense(q, k, v, bounds, scale, window=None, causal=True):
    t = q.shape[0]
    seg = torch.zeros(t, dtype=torch.long)
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[a:b] = j
    i = torch.arange(t)
    allowed = ((i[None, :] <= i[:, None]) | (not causal)) & (seg[None, :] == seg[:, None])
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                         attn_mask=allowed.to(q.device), scale=scale)
    return out.transpose(0, 1)


def _qkv(t, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(t, h, dim, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def test_boundaries_restart_with_positions_and_rows():
    # two rows of 8: [0 1 2 | 0 1 | 0 1 2] and [0 1 2 3 4 | 5 6 7 (a tail continuing)]: row start breaks too
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert segment_boundaries(positions) == [0, 3, 5, 8, 16]
    padded = padded_boundaries([0, 3, 5, 8, 16], "cpu")
    assert padded.tolist() == [0, 3, 5, 8, 16, 16, 16, 16] and padded.dtype == torch.int32
    assert max_segment_length([0, 3, 5, 8, 16], 16) == 16      # rounded up, capped at the row
    assert max_segment_length([0, 300, 400], 4096) == 512


@pytest.mark.parametrize("window,causal", [(None, True), (3, True), (None, False)])
def test_reference_equals_the_dense_masked_attention(window, causal):
    bounds = [0, 5, 6, 13, 20]
    q, k, v = _qkv(20)
    cu = padded_boundaries(bounds, "cpu")        # empty padded segments are skipped
    got = reference_varlen(q, k, v, cu, scale=0.3, window=window, causal=causal)
    torch.testing.assert_close(got, _dense(q, k, v, bounds, 0.3, window, causal))
    # and the result differs from attention over the whole row (the test can fail)
    assert not torch.allclose(got, _dense(q, k, v, [0, 20], 0.3, window, causal), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("window,causal", [(None, True), (64, True), (None, False)])
def test_flash_varlen_matches_reference_forward_and_backward(window, causal):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bounds = [0, 700, 701, 1800, 2048, 4096]       # a 1-token sample and a long one
    cu = padded_boundaries(bounds, "cuda")
    q, k, v = (x.requires_grad_() for x in _qkv(4096, heads=12, kv_heads=2, dim=128, dtype=torch.bfloat16,
                                               device="cuda"))
    out = varlen_attention(q, k, v, cu, max_segment_length(bounds, 4096), scale=128 ** -0.5, window=window,
                           causal=causal)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = _dense(q32, k32, v32, bounds, 128 ** -0.5, window, causal)
    ref.backward(grad.float())
    for a, b, name in zip(got, [ref.detach(), q32.grad, k32.grad, v32.grad], ["out", "dq", "dk", "dv"]):
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err < 2e-2, f"{name}: relative max error {err}"


@pytest.mark.gpu
def test_flash_varlen_compiles_without_graph_breaks():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from torch import _dynamo

    q, k, v = _qkv(1024, heads=8, kv_heads=8, dim=64, dtype=torch.bfloat16, device="cuda")
    cu = padded_boundaries([0, 100, 1024], "cuda")
    fn = lambda q, k, v, cu: varlen_attention(q, k, v, cu, 1024, scale=0.125) * 2  # noqa: E731
    explained = _dynamo.explain(fn)(q, k, v, cu)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v, cu), fn(q, k, v, cu))
