"""Batched vision attention: the same tower output as HF's image-by-image loop, in one SDPA call."""

import copy

import pytest
import torch

import vlm
from vlm.vision_attention import batch_equal_images


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    model, _ = vlm.load(tiny_checkpoint("qwen2_vl"), dtype="fp32", device="cpu")
    return model


def _sdpa_calls(monkeypatch):
    calls = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return orig(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _tower_outputs(model, batched, grid, monkeypatch, seed):
    """(HF's tower output, the batched tower's, the SDPA query shapes of the batched run) on random
    patches for ``grid`` (rows t, h, w)."""
    g = torch.tensor(grid)
    n_patches = int((g[:, 0] * g[:, 1] * g[:, 2]).sum())
    x = torch.randn(n_patches, model.model.visual.patch_embed.proj.weight[0].numel(),
                    generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model.model.visual(x, grid_thw=g).pooler_output
        calls = _sdpa_calls(monkeypatch)
        out = batched.model.visual(x, grid_thw=g).pooler_output
    return ref, out, calls


@pytest.mark.parametrize("grid", [[[1, 4, 4]] * 3, [[2, 4, 6]], [[1, 4, 4], [1, 2, 4]]],
                         ids=["3 equal images", "2 frames of one video", "unequal images"])
def test_same_tower_output(qwen, grid, monkeypatch):
    batched = copy.deepcopy(qwen)
    n_attn = batch_equal_images(batched, qwen.vlm_family)
    assert n_attn == qwen.config.vision_config.depth
    assert batch_equal_images(batched, qwen.vlm_family) == n_attn          # idempotent
    ref, out, calls = _tower_outputs(qwen, batched, grid, monkeypatch, seed=0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    frames = sum(t for t, _, _ in grid)
    sizes = {h * w for _, h, w in grid}
    if len(sizes) == 1:   # one call per block over all frames
        assert calls == [(frames, qwen.config.vision_config.num_heads, sizes.pop(),
                          qwen.config.vision_config.embed_dim // qwen.config.vision_config.num_heads)] * n_attn
    else:                 # HF's loop: a call per frame per block
        assert len(calls) == frames * n_attn
    # outside a tower call the modules fall back to HF's forward
    assert all(m._vlm_uniform_len is None for m in batched.model.visual._vlm_uniform_modules)


def test_other_towers_untouched(tiny_checkpoint):
    model, _ = vlm.load(tiny_checkpoint("llava"), dtype="fp32", device="cpu")
    assert batch_equal_images(model, model.vlm_family) == 0


@pytest.fixture(scope="module")
def qwen25(tiny_checkpoint):
    model, _ = vlm.load(tiny_checkpoint("qwen2_5_vl"), dtype="fp32", device="cpu")
    return model


@pytest.mark.parametrize("grid", [[[1, 8, 8]] * 3, [[2, 4, 8]], [[1, 4, 4], [1, 8, 4]], [[1, 6, 6]] * 2],
                         ids=["3 equal images", "2 frames of one video", "unequal images, equal windows",
                              "windows cut by the image border"])
def test_qwen2_5_vl_windows_same_tower_output(qwen25, grid, monkeypatch):
    tower_cfg = qwen25.config.vision_config
    batched = copy.deepcopy(qwen25)
    assert batch_equal_images(batched, qwen25.vlm_family) == tower_cfg.depth
    tower = batched.model.visual
    windowed = [m._vlm_window for m in tower._vlm_uniform_modules]
    assert windowed == [i not in tower_cfg.fullatt_block_indexes for i in range(tower_cfg.depth)]
    ref, out, calls = _tower_outputs(qwen25, batched, grid, monkeypatch, seed=1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    n_patches = sum(t * h * w for t, h, w in grid)
    merge, side = tower.spatial_merge_size, tower.window_size // tower.spatial_merge_size // tower.patch_size
    window_len = side * side * merge * merge
    windows_equal = all((h // merge) % side == 0 and (w // merge) % side == 0 for _, h, w in grid)
    frames_equal = len({h * w for _, h, w in grid}) == 1
    window_calls = [c for c in calls if c[2] == window_len and c[0] == n_patches // window_len]
    # a batched window block is one call over all n windows; otherwise HF's loop, a call per window
    assert len(window_calls) == (sum(windowed) if windows_equal else 0), calls
    frames = sum(t for t, _, _ in grid)
    frame_calls = [c for c in calls if frames_equal and c[0] == frames and c[2] == grid[0][1] * grid[0][2]]
    assert len(frame_calls) == (len(windowed) - sum(windowed) if frames_equal else 0), calls


def test_qwen3_vl_tower_batched_equals_hf(tiny_checkpoint, monkeypatch):
    """Qwen3-VL's tower (DeepStack features included) through the batched path: HF's numbers, one
    SDPA call per block for equal images."""
    model, _ = vlm.load(tiny_checkpoint("qwen3_vl"), dtype="fp32", device="cpu")
    batched = copy.deepcopy(model)
    depth = model.config.vision_config.depth
    assert batch_equal_images(batched, model.vlm_family) == depth
    grid = torch.tensor([[1, 4, 4]] * 3)
    x = torch.randn(48, model.model.visual.patch_embed.proj.weight[0].numel(),
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.model.visual(x, grid_thw=grid)
        calls = _sdpa_calls(monkeypatch)
        out = batched.model.visual(x, grid_thw=grid)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-6, atol=1e-6)
    for a, b in zip(out.deepstack_features, ref.deepstack_features, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(calls) == depth and all(c[0] == 3 for c in calls)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_unequal_images_run_one_flash_varlen_call_per_block(tiny_checkpoint, variant):
    """On a GPU, frames of different sizes go through the flash varlen kernel in one call per block
    (no per-frame loop, no host read per block): the same tower output as HF's loop, in bf16."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, _ = vlm.load(tiny_checkpoint(variant), dtype="bf16", device="cuda")
    batched = copy.deepcopy(model)
    batch_equal_images(batched, model.vlm_family)
    grid = torch.tensor([[1, 8, 8], [1, 4, 8], [2, 8, 4]], device="cuda")
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    x = torch.randn(n, model.model.visual.patch_embed.proj.weight[0].numel(),
                    generator=torch.Generator().manual_seed(2)).to("cuda", torch.bfloat16)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = batched.model.visual(x, grid_thw=grid).pooler_output
    with torch.no_grad():
        ref = model.model.visual(x, grid_thw=grid).pooler_output
    err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert err < 2e-2, err
    names = [e.key for e in prof.key_averages()]
    assert any("flash_fwd" in name for name in names), names
