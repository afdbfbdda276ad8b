"""Batched vision attention: the same tower output as HF's image-by-image loop, in one SDPA call."""

import copy

import pytest
import torch

import vlm
from vlm.families import all_families
from vlm.train.compile import vision_blocks
from vlm.vision_attention import batch_equal_images, frame_lengths, plan_segments, window_lengths
from vlm.zoo import VARIANTS

# zoo variants of the families whose record names vision attention classes to batch
BATCHED_VARIANTS = [v for f in all_families().values() if f.batched_vision_attention for v in f.zoo_variants]


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


@pytest.mark.parametrize("grid", [[[1, 4, 4]] * 3, [[2, 4, 6]], [[1, 4, 4], [1, 2, 4]], [[1, 4, 6], [2, 4, 4], [1, 2, 6]]],
                         ids=["3 equal images", "2 frames of one video", "unequal images",
                              "mixed images and a video"])
def test_same_tower_output(qwen, grid, monkeypatch):
    batched = copy.deepcopy(qwen)
    n_attn = batch_equal_images(batched, qwen.vlm_family)
    assert n_attn == qwen.config.vision_config.depth
    assert batch_equal_images(batched, qwen.vlm_family) == n_attn          # idempotent
    ref, out, calls = _tower_outputs(qwen, batched, grid, monkeypatch, seed=0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    frames = sum(t for t, _, _ in grid)
    longest = max(h * w for _, h, w in grid)
    # one call per block over all frames, unequal ones padded to the longest
    assert calls == [(frames, qwen.config.vision_config.num_heads, longest,
                      qwen.config.vision_config.embed_dim // qwen.config.vision_config.num_heads)] * n_attn
    # outside a tower call the modules fall back to HF's forward
    assert all(m._vlm_segments is None for m in batched.model.visual._vlm_uniform_modules)


def test_padding_past_the_cost_bound_runs_one_call_per_image(qwen, monkeypatch):
    """One large image among small ones: padding would cost more than MAX_PADDED_COST times the
    per-image attention, so one SDPA per frame runs (as HF's loop, without its host read per
    block), with the same numbers."""
    grid = [[1, 8, 8]] + [[1, 2, 2]] * 6     # 7·64² = 28,672 > 2·(64² + 6·4²) = 8,384 score entries
    assert plan_segments(frame_lengths(grid), "cpu") is None
    batched = copy.deepcopy(qwen)
    n_attn = batch_equal_images(batched, qwen.vlm_family)
    ref, out, calls = _tower_outputs(qwen, batched, grid, monkeypatch, seed=2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert len(calls) == len(grid) * n_attn


def test_padded_plan_gathers_and_scatters_back():
    lengths = [3, 1, 2]
    seg = plan_segments(lengths, "cpu")
    assert seg.length is None and seg.n == 3 and seg.patches == 6
    assert seg.gather.tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 4]]
    assert seg.keep[:, 0, 0].tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    x = torch.arange(6)
    assert x[seg.gather].reshape(-1)[seg.scatter].tolist() == x.tolist()
    assert plan_segments([5, 5], "cpu").length == 5 and plan_segments([], "cpu") is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_where_the_family_says_other_towers_untouched(tiny_checkpoint, variant):
    """Every attention module of a tower whose family names its class in ``batched_vision_attention``
    is batched (one per vision block: a misspelt class name batches none); other towers keep HF's
    forward."""
    model, _ = vlm.load(tiny_checkpoint(variant), dtype="fp32", device="cpu")
    family = model.vlm_family
    expected = len(vision_blocks(model, family)) if family.batched_vision_attention else 0
    assert batch_equal_images(model, family) == expected
    patched = [m for m in model.modules() if "_vlm_hf_forward" in vars(m)]
    assert len(patched) == expected
    towers = [tower for _, tower in family.component_roots(model, "vision")]
    assert all(("_vlm_tower_forward" in vars(t)) == bool(expected) for t in towers)


@pytest.fixture(scope="module")
def qwen25(tiny_checkpoint):
    model, _ = vlm.load(tiny_checkpoint("qwen2_5_vl"), dtype="fp32", device="cpu")
    return model


@pytest.mark.parametrize("grid", [[[1, 8, 8]] * 3, [[2, 4, 8]], [[1, 4, 4], [1, 8, 4]], [[1, 6, 6]] * 2, [[1, 6, 10], [2, 4, 4]]],
                         ids=["3 equal images", "2 frames of one video", "unequal images, equal windows",
                              "windows cut by the image border", "mixed sizes, uneven windows"])
def test_qwen2_5_vl_windows_same_tower_output(qwen25, grid, monkeypatch):
    tower_cfg = qwen25.config.vision_config
    batched = copy.deepcopy(qwen25)
    assert batch_equal_images(batched, qwen25.vlm_family) == tower_cfg.depth
    tower = batched.model.visual
    windowed = [m._vlm_window for m in tower._vlm_uniform_modules]
    assert windowed == [i not in tower_cfg.fullatt_block_indexes for i in range(tower_cfg.depth)]
    ref, out, calls = _tower_outputs(qwen25, batched, grid, monkeypatch, seed=1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    merge, side = tower.spatial_merge_size, tower.window_size // tower.spatial_merge_size // tower.patch_size
    heads, head_dim = tower_cfg.num_heads, tower_cfg.hidden_size // tower_cfg.num_heads
    expected = []   # one call per block: (segments, heads, longest, d), or HF's loop past the cost bound
    for w in windowed:
        lengths = window_lengths(grid, merge, side) if w else frame_lengths(grid)
        if plan_segments(lengths, "cpu") is None:
            expected += [(heads, L, head_dim) for L in lengths]   # one SDPA per segment (varlen reference)
        else:
            expected.append((len(lengths), heads, max(lengths), head_dim))
    assert calls == expected
    assert sum(c[0] > 1 for c in calls) >= 1   # at least one batched call in each case


@pytest.mark.parametrize("rows", [[[1, 4, 4]] * 3, [[1, 4, 4], [2, 4, 6], [1, 2, 4]]],
                         ids=["3 equal images", "mixed images and a video"])
def test_qwen3_vl_tower_batched_equals_hf(tiny_checkpoint, monkeypatch, rows):
    """Qwen3-VL's tower (DeepStack features included) through the batched path: HF's numbers, one
    SDPA call per block over every frame."""
    model, _ = vlm.load(tiny_checkpoint("qwen3_vl"), dtype="fp32", device="cpu")
    batched = copy.deepcopy(model)
    depth = model.config.vision_config.depth
    assert batch_equal_images(batched, model.vlm_family) == depth
    grid = torch.tensor(rows)
    x = torch.randn(sum(t * h * w for t, h, w in rows), model.model.visual.patch_embed.proj.weight[0].numel(),
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.model.visual(x, grid_thw=grid)
        calls = _sdpa_calls(monkeypatch)
        out = batched.model.visual(x, grid_thw=grid)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-6, atol=1e-6)
    for a, b in zip(out.deepstack_features, ref.deepstack_features, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    frames = sum(t for t, _, _ in rows)
    assert len(calls) == depth and all(c[0] == frames for c in calls)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", BATCHED_VARIANTS)
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
