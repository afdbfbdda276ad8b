import pytest
import torch

from vlm.kernels.rope import (mrope, mrope_cos_sin_reference, mrope_reference, rope,
                              rope_reference)

from kernel_testutil import DEVICE, assert_close


def _qk(B, S, HQ, HK, D, dtype):
    # HF layout: (B, S, H, D) projections viewed as (B, H, S, D)
    q = torch.randn(B, S, HQ, D, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, S, HK, D, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_(True)
    return q, k


def _inv_freq(D, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, D, 2, device=DEVICE).float() / D))


def _positions(B, S):
    # text positions then an image grid: (t, h, w) rows differ, as Qwen2-VL's get_rope_index makes
    pos = torch.arange(S, device=DEVICE).expand(3, B, S).clone()
    pos[1, :, S // 3:] = torch.randint(0, 40, (B, S - S // 3), device=DEVICE)
    pos[2, :, S // 2:] = torch.randint(0, 40, (B, S - S // 2), device=DEVICE)
    return pos


def _backward_pair(qo, ko, q, k, a, b, qr, kr, dtype):
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    ((qo * dq).sum() + (ko * dk).sum()).backward()
    ((a * dq.double()).sum() + (b * dk.double()).sum()).backward()
    assert_close(qo, a, dtype, "q'")
    assert_close(ko, b, dtype, "k'")
    assert_close(q.grad, qr.grad, dtype, "dq")
    assert_close(k.grad, kr.grad, dtype, "dk")


def _check_rope(B, S, HQ, HK, D, dtype, batch_cos):
    q, k = _qk(B, S, HQ, HK, D, dtype)
    sec = (D // 8, (D // 2 - D // 8) // 2, D // 2 - D // 8 - (D // 2 - D // 8) // 2)
    cos, sin = mrope_cos_sin_reference(_positions(B, S), _inv_freq(D), sec)
    if not batch_cos:
        cos, sin = cos[:1], sin[:1]
    cos, sin = cos.to(dtype), sin.to(dtype)
    qo, ko = rope(q, k, cos, sin)
    qr = q.detach().double().requires_grad_(True)
    kr = k.detach().double().requires_grad_(True)
    a, b = rope_reference(qr, kr, cos.double(), sin.double())
    _backward_pair(qo, ko, q, k, a, b, qr, kr, dtype)


def _check_mrope(B, S, HQ, HK, D, dtype, sec):
    q, k = _qk(B, S, HQ, HK, D, dtype)
    pos, invf = _positions(B, S), _inv_freq(D)
    qo, ko = mrope(q, k, pos, invf, sec)
    qr = q.detach().double().requires_grad_(True)
    kr = k.detach().double().requires_grad_(True)
    a, b = mrope_reference(qr, kr, pos, invf.double(), sec)
    _backward_pair(qo, ko, q, k, a, b, qr, kr, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,HQ,HK,D,batch_cos", [(5, 123, 3, 1, 16, True), (2, 37, 6, 2, 32, False)])
def test_rope_small(B, S, HQ, HK, D, batch_cos, dtype):
    _check_rope(B, S, HQ, HK, D, dtype, batch_cos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,HQ,HK,D,sec", [(5, 123, 3, 1, 16, (2, 3, 3)), (2, 37, 6, 2, 32, (4, 6, 6))])
def test_mrope_small(B, S, HQ, HK, D, sec, dtype):
    _check_mrope(B, S, HQ, HK, D, dtype, sec)


def test_mrope_matches_hf_rotary_module():
    """Our in-kernel cos/sin equal HF's Qwen2VLRotaryEmbedding output (transformers' own code)."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (Qwen2VLRotaryEmbedding,
                                                                apply_rotary_pos_emb)

    cfg = Qwen2VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": [2, 3, 3]})).text_config
    rot = Qwen2VLRotaryEmbedding(cfg).to(DEVICE)
    B, S = 2, 19
    pos = _positions(B, S)
    q = torch.randn(B, 4, S, 16, device=DEVICE)
    k = torch.randn(B, 2, S, 16, device=DEVICE)
    cos, sin = rot(q, pos)
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    mq, mk = mrope(q, k, pos, rot.inv_freq, [2, 3, 3])
    assert_close(mq, hq, torch.float32, "q vs HF", factor=10)
    assert_close(mk, hk, torch.float32, "k vs HF", factor=10)


def test_bad_section_is_an_error():
    q, k = _qk(1, 4, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="sum to head_dim/2"):
        mrope(q, k, torch.zeros(3, 1, 4, dtype=torch.long, device=DEVICE), _inv_freq(16), (2, 2, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,HQ,HK,D", [(1, 16384, 12, 2, 128), (2, 4096, 28, 4, 128), (5, 123, 3, 1, 16)])
def test_rope_full(B, S, HQ, HK, D, dtype):
    _check_rope(B, S, HQ, HK, D, dtype, True)
    sec = (16, 24, 24) if D == 128 else (2, 3, 3)
    _check_mrope(B, S, HQ, HK, D, dtype, sec)
