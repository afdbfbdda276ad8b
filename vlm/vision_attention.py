"""One attention call per vision block for a batch of equal-size images (Qwen2-VL, Qwen2.5-VL towers).

Qwen2-VL's vision tower packs every image of a batch into one sequence of N patches and, outside
flash-attention builds, runs attention *image by image* (``torch.split`` by ``cu_seqlens``, one SDPA
call per image frame, then ``torch.cat``): 8 images × 32 blocks = 256 small attention calls plus the
split/cat per step, and the per-image lengths come from a device-to-host copy in every block.

When every frame of the batch has the same patch count L (fixed-resolution training, the common
case), the packed sequence is exactly n = N / L independent sequences of length L, so

    attn(x)[image i] = softmax(q_i k_iᵀ · d^-½) v_i      for i = 1..n

is one batched SDPA over (n, heads, L, d) — the same numbers, one kernel. Frames of different sizes
(mixed image sizes, the realistic case) run as one non-causal varlen attention over the tower's own
``cu_seqlens`` (``vlm.train.varlen_attention``: flash-attention varlen on a GPU, the same per-frame
SDPA as HF elsewhere), sized by the largest frame read from ``grid_thw`` with the frame sizes. The tower's wrapper reads
the frame sizes from ``grid_thw`` once per forward; each attention module uses the batched path only
while that mark is set, and HF's own forward otherwise (unequal sizes, or a direct module call).

Qwen2.5-VL's tower runs 28 of its 32 blocks over *windows* and the others over whole frames (HF:
one SDPA call per window, 16 per 448² image per block). Its windows are equal whenever each frame's
merged grid is a multiple of the window side w = window_size / (patch_size · spatial_merge_size) in
both directions (112 px windows: image sides that are multiples of 112 px): every window then holds
w² · merge² consecutive patches (the tower has already permuted patches into window order, rotary
tables included), so the window blocks batch the same way with L = w² · merge², and the
full-attention blocks with L = h · w.

Handled: Qwen2-VL's ``VisionAttention``, Qwen2.5-VL's ``Qwen2_5_VLVisionAttention`` and Qwen3-VL's
``Qwen3VLVisionAttention`` (same fields and math; their forward, transformers 5.17–5.19, is
reproduced below). Used by training
(``vlm train``) and by the eval harness's local generation.
"""

from __future__ import annotations

import sys
from types import MethodType

import torch
from torch import nn


def _uniform_attention_forward(self, hidden_states, cu_seqlens=None, position_embeddings=None, **kwargs):
    seg = self._vlm_uniform_len
    uniform = seg is not None and hidden_states.shape[0] % seg == 0
    if position_embeddings is None or not (uniform or (self._vlm_varlen and cu_seqlens is not None)):
        return self._vlm_hf_forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    n_tok = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n_tok, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    if not uniform:   # frames (or windows) of different sizes: one varlen call over cu_seqlens
        from vlm.train.varlen_attention import varlen_attention
        # _vlm_max_len: a CPU tensor filled per forward (a changing int would be guarded on when compiled)
        out = varlen_attention(q, k, v, cu_seqlens.to(torch.int32), self._vlm_max_len, scale=self.scaling,
                               causal=False)
        return self.proj(out.reshape(n_tok, -1))
    n = n_tok // seg

    def frames(t):   # (N, heads, d) -> (n, heads, L, d)
        return t.reshape(n, seg, self.num_heads, -1).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(frames(q), frames(k), frames(v), scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(n_tok, -1))


def _segment_lengths(tower, rows: list[list[int]]) -> tuple[int | None, int | None]:
    """(frame length, window length) in patches when all frames / all windows are equal, else None."""
    sizes = {h * w for _, h, w in rows}
    frame = next(iter(sizes)) if len(sizes) == 1 else None
    window = None
    side = _window_side(tower)
    if side and rows and all(h % tower.spatial_merge_size == 0 and w % tower.spatial_merge_size == 0
                             and (h // tower.spatial_merge_size) % side == 0
                             and (w // tower.spatial_merge_size) % side == 0 for _, h, w in rows):
        window = side * side * tower.spatial_merge_size ** 2
    return frame, window


def _window_side(tower) -> int:
    """Qwen2.5-VL: windows of side w merged patches (0: the tower has no windows)."""
    if not hasattr(tower, "window_size"):
        return 0
    return max(tower.window_size // tower.spatial_merge_size // tower.patch_size, 0)


def _longest(tower, rows: list[list[int]]) -> tuple[int, int]:
    """Upper bounds of a frame's and a window's patch count (the varlen kernels' grid size)."""
    frame = max(h * w for _, h, w in rows)
    side = _window_side(tower)
    return frame, min(frame, side * side * tower.spatial_merge_size ** 2) if side else frame


def _tower_forward(self, hidden_states, grid_thw=None, *args, **kwargs):
    frame = window = longest = None
    if grid_thw is not None:   # one host read per forward, not per block
        rows = grid_thw.tolist()
        frame, window = _segment_lengths(self, rows)
        longest = _longest(self, rows) if rows else None
    for mod in self._vlm_uniform_modules:
        mod._vlm_uniform_len = window if mod._vlm_window else frame
        mod._vlm_varlen = longest is not None
        if longest is not None:
            mod._vlm_max_len.fill_(longest[1] if mod._vlm_window else longest[0])
    try:
        return self._vlm_tower_forward(hidden_states, grid_thw, *args, **kwargs)
    finally:
        for mod in self._vlm_uniform_modules:
            mod._vlm_uniform_len, mod._vlm_varlen = None, False


_ATTENTION_CLASSES = {("VisionAttention", "qwen2_vl.modeling_qwen2_vl"),
                      ("Qwen2_5_VLVisionAttention", "qwen2_5_vl.modeling_qwen2_5_vl"),
                      ("Qwen3VLVisionAttention", "qwen3_vl.modeling_qwen3_vl")}


def _is_qwen_vision_attention(mod: nn.Module) -> bool:
    return (any(type(mod).__name__ == name and type(mod).__module__.endswith(module)
                for name, module in _ATTENTION_CLASSES)
            and all(hasattr(mod, a) for a in ("qkv", "proj", "num_heads", "scaling")))


def _windowed(tower: nn.Module, mods: list[nn.Module]) -> list[bool]:
    """Per attention module: does its block attend within windows (Qwen2.5-VL) rather than frames?"""
    full = getattr(tower, "fullatt_block_indexes", None)
    blocks = getattr(tower, "blocks", None)
    if full is None or blocks is None:
        return [False] * len(mods)
    block_of = {id(m): i for i, blk in enumerate(blocks) for m in blk.modules()}
    return [id(m) in block_of and block_of[id(m)] not in set(full) for m in mods]


def batch_equal_images(model: nn.Module, family) -> int:
    """Install the batched path on every Qwen2-VL / Qwen2.5-VL vision attention of ``model``; returns
    how many (0 for other towers). Idempotent."""
    n = 0
    for _, tower in family.component_roots(model, "vision"):
        if "_vlm_tower_forward" in tower.__dict__:
            n += len(tower._vlm_uniform_modules)
            continue
        mods = [m for m in tower.modules() if _is_qwen_vision_attention(m)]
        if not mods:
            continue
        for m, windowed in zip(mods, _windowed(tower, mods)):
            m._vlm_window = windowed
            m._vlm_uniform_len, m._vlm_varlen = None, False
            m._vlm_max_len = torch.zeros(1, dtype=torch.int32)
            m._vlm_hf_forward = m.forward
            m.forward = MethodType(_uniform_attention_forward, m)
        tower._vlm_uniform_modules = mods
        tower._vlm_tower_forward = tower.forward
        tower.forward = MethodType(_tower_forward, tower)
        n += len(mods)
    return n
