"""One attention call per vision block for a batch of images (Qwen2-VL, Qwen2.5-VL, Qwen3-VL towers).

Qwen2-VL's vision tower packs every image of a batch into one sequence of N patches and, outside
flash-attention builds, runs attention *image by image* (``torch.split`` by ``cu_seqlens``, one SDPA
call per image frame, then ``torch.cat``): 8 images × 32 blocks = 256 small attention calls plus the
split/cat per step, and the per-image lengths come from a device-to-host copy in every block — a
data-dependent ``.tolist()`` that also breaks a ``torch.compile`` graph in every block.

The packed sequence is n independent segments (frames, or Qwen2.5-VL's windows) of lengths
L_1..L_n, and attention never crosses a segment:

    attn(x)[segment i] = softmax(q_i k_iᵀ · d^-½) v_i      for i = 1..n

- on a GPU in 16-bit, equal lengths or not: one non-causal flash-attention varlen
  call over the tower's own ``cu_seqlens`` (``vlm.train.varlen_attention``: Σ L_i² work, an opaque
  op inside compiled blocks), sized by the longest segment read from ``grid_thw``;
- equal lengths L elsewhere (CPU, fp32): the packed (N, heads, d) tensors are exactly
  (n, heads, L, d), one batched SDPA, no copy;
- unequal lengths elsewhere: each segment is gathered into a row of an (n, L_max) grid,
  the L_max − L_i padding keys of row i masked out (weight exp(−∞) = 0, so each real query's softmax
  runs over its own segment's keys only: the same function), one batched SDPA, and the real rows
  gathered back to packed order. It costs n·L_max² score entries instead of Σ L_i², so the padded
  path is taken only while n·L_max² ≤ ``MAX_PADDED_COST`` · Σ L_i²; past that (one large image among
  many small ones) one SDPA per segment runs, as in HF's loop.

The tower's wrapper reads the segment lengths from ``grid_thw`` once per forward (one host read, not
one per block; none when the grid is a host tensor, as packed training batches pass it: then it also
builds transformers' own grid-derived inputs on the host, :func:`precomputed_inputs`), builds the gather indices and key mask on the device once, and marks each attention
module; a module uses the batched path only while that mark is set, and HF's own forward otherwise
(a direct module call). With the indices as tensor inputs (or the flash varlen op), nothing in a
block depends on data: compiled vision blocks trace whole (``vlm.train.compile``).

Qwen2.5-VL's tower runs most blocks over *windows* of side w = window_size / (patch_size ·
spatial_merge_size) merged patches and the others over whole frames; the tower has already permuted
patches into window order (rotary tables included), so window j holds rows_j · cols_j · merge²
consecutive patches, where rows_j, cols_j ≤ w are what of the window lies inside the image.

Handled: the attention classes a family record names in ``batched_vision_attention`` (today
Qwen2-VL's ``VisionAttention``, Qwen2.5-VL's ``Qwen2_5_VLVisionAttention`` and Qwen3-VL's
``Qwen3VLVisionAttention``: same fields and math; their forward, transformers 5.17–5.19, is
reproduced below). Used by training (``vlm train``) and by the eval harness's local generation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import MethodType

import torch
from torch import nn

# The padded path may compute up to this many times the score entries of per-segment attention.
MAX_PADDED_COST = 2.0


@dataclass(frozen=True)
class Segments:
    """How one tower forward's packed sequence splits into attention segments.

    ``length``: every segment has this many patches (no gather); else ``gather`` (n, L_max) indices
    of each row's patches in the packed sequence (padding repeats the row's first patch),
    ``keep`` (n, 1, 1, L_max) True at real keys, ``scatter`` (N,) the position of each packed patch
    in the flattened (n · L_max) grid."""

    n: int
    length: int | None = None
    gather: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    scatter: torch.Tensor | None = None

    @property
    def patches(self) -> int:
        """N, the packed sequence's length."""
        return self.n * self.length if self.length is not None else self.scatter.shape[0]


def plan_segments(lengths: list[int], device) -> Segments | None:
    """The batched layout of segments of ``lengths`` patches, or None where padding costs too much."""
    if not lengths:
        return None
    n, longest = len(lengths), max(lengths)
    if len(set(lengths)) == 1:
        return Segments(n=n, length=longest)
    if n * longest * longest > MAX_PADDED_COST * sum(L * L for L in lengths):
        return None
    lens = torch.tensor(lengths)
    starts = torch.cumsum(lens, 0) - lens
    cols = torch.arange(longest)
    keep = cols[None, :] < lens[:, None]                               # (n, L_max)
    gather = torch.where(keep, starts[:, None] + cols[None, :], starts[:, None])
    scatter = (torch.arange(n)[:, None] * longest + cols[None, :])[keep]   # row-major = packed order
    return Segments(n=n, gather=to_device_async(gather, device),
                    keep=to_device_async(keep[:, None, None, :].contiguous(), device),
                    scatter=to_device_async(scatter, device))


def _batched_attention_forward(self, hidden_states, cu_seqlens=None, position_embeddings=None, **kwargs):
    from vlm.train.varlen_attention import flash_applies, varlen_attention

    seg = self._vlm_segments
    n_tok = hidden_states.shape[0]
    if position_embeddings is None or not self._vlm_varlen or cu_seqlens is None or (
            seg is not None and n_tok != seg.patches):
        return self._vlm_hf_forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    q, k, v = self.qkv(hidden_states).reshape(n_tok, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    uniform = seg is not None and seg.length is not None
    padded = seg is not None and seg.length is None
    if not uniform and (not padded or flash_applies(q)):
        # unequal segments: flash varlen on a GPU; one SDPA per segment past the padding bound elsewhere
        # _vlm_max_len: a CPU tensor filled per forward (a changing int would be guarded on when compiled)
        # the per-segment fallback slices by the host boundaries (no read back); never read inside
        # compiled code, where a list attribute would be guarded on (one recompile per image mix)
        host_bounds = None if torch.compiler.is_compiling() or flash_applies(q) else self._vlm_bounds
        out = varlen_attention(q, k, v, cu_seqlens.to(torch.int32), self._vlm_max_len, scale=self.scaling,
                               causal=False, host_bounds=host_bounds)
        return self.proj(out.reshape(n_tok, -1))
    if uniform:
        def rows(t):   # (N, heads, d) -> (n, heads, L, d): a view
            return t.reshape(seg.n, seg.length, self.num_heads, -1).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(rows(q), rows(k), rows(v), scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(n_tok, -1))

    def rows(t):       # (N, heads, d) -> (n, heads, L_max, d): each segment gathered into its row
        return t[seg.gather].transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=seg.keep,
                                                           scale=self.scaling)
    out = out.transpose(1, 2).reshape(seg.gather.numel(), -1)[seg.scatter]
    return self.proj(out)


def frame_lengths(rows: list[list[int]]) -> list[int]:
    """Patches per frame: each (t, h, w) row of ``grid_thw`` is t frames of h·w patches."""
    return [h * w for t, h, w in rows for _ in range(t)]


def window_lengths(rows: list[list[int]], merge: int, side: int) -> list[int]:
    """Patches per Qwen2.5-VL window, in the tower's window order: each frame's (h/merge, w/merge)
    grid of merged patches cut into side × side windows row by row, the last row and column of
    windows cut short by the image border; each merged patch is merge² patches."""
    out = []
    for t, h, w in rows:
        gh, gw = h // merge, w // merge
        heights = [min(side, gh - i) for i in range(0, gh, side)]
        widths = [min(side, gw - j) for j in range(0, gw, side)]
        out.extend(a * b * merge * merge for _ in range(t) for a in heights for b in widths)
    return out


def _window_side(tower) -> int:
    """Qwen2.5-VL: windows of side w merged patches (0: the tower has no windows)."""
    if not hasattr(tower, "window_size"):
        return 0
    return max(tower.window_size // tower.spatial_merge_size // tower.patch_size, 0)


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without a host wait: a blocking copy (``.to(device)``) makes the
    host wait for everything queued on the GPU; from pinned memory the copy is queued instead."""
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _uses(tower, helper: str) -> bool:
    """Whether the tower's modeling module calls transformers' ``vision_utils.<helper>``."""
    return hasattr(sys.modules[type(tower).__module__], helper)


def precomputed_inputs(tower, grid: torch.Tensor, device) -> dict[str, torch.Tensor | int]:
    """What the tower's forward derives from ``grid_thw`` with transformers' ``vision_utils``
    helpers (patch positions, segment boundaries; Qwen2.5-VL's window order and window boundaries;
    Qwen3-VL's position-embedding interpolation), computed here by the same helpers on a HOST grid
    and queued to ``device``: the tower pops them from its keyword arguments (transformers' own
    precomputed-input path) instead of running ``repeat_interleave``/``tolist``/``unique_consecutive``
    on a device grid, each a host wait. The longest segment only where transformers would read it
    (flash attention requested), as a Python int, as it computes."""
    from transformers import vision_utils as vu
    from transformers.utils.generic import get_max_seqlen

    out: dict[str, torch.Tensor | int] = {}
    if _uses(tower, "get_vision_interpolation_indices_and_weights"):   # Qwen3-VL
        out["interp_indices"], out["interp_weights"] = vu.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.config.spatial_merge_size)
    out["position_ids"] = vu.get_vision_position_ids(grid, tower.spatial_merge_size)
    out["cu_seqlens"] = vu.get_vision_cu_seqlens(grid)
    longest = get_max_seqlen(out["cu_seqlens"], tower.config)
    if longest is not None:
        out["max_seqlen"] = int(longest)
    if _uses(tower, "get_vision_window_index"):   # Qwen2.5-VL
        out["window_index"], out["cu_window_seqlens"] = vu.get_vision_window_index(
            grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size,
            patch_size=tower.patch_size)
        longest = get_max_seqlen(out["cu_window_seqlens"], tower.config, kwarg_name="max_window_seqlen")
        if longest is not None:
            out["max_window_seqlen"] = int(longest)
    return {k: to_device_async(v, device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _bounds(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _tower_forward(self, hidden_states, grid_thw=None, *args, **kwargs):
    from vlm.train.varlen_attention import flash_applies

    marks = {False: (None, None, None), True: (None, None, None)}   # windowed? -> (segments, longest, bounds)
    if grid_thw is not None and grid_thw.device.type == "cpu" and hidden_states.device.type != "cpu":
        # a host grid (the packing collator ships one): transformers' grid-derived inputs built on
        # the host and queued to the device, nothing read back
        for key, value in precomputed_inputs(self, grid_thw, hidden_states.device).items():
            kwargs.setdefault(key, value)
    rows = grid_thw.tolist() if grid_thw is not None else []   # a device grid: one host read per forward
    if rows:
        device = hidden_states.device
        # where the flash varlen kernel runs (GPU, 16-bit), every layout takes it, equal segments too:
        # no padded layout to build on the device, and no segment object (its image count and length
        # are Python ints) for compiled blocks to guard on — a batch of equal images of a new size
        # would recompile every block, at a step that differs between processes (vlm.train.compile)
        first = self._vlm_uniform_modules[0]
        flash = flash_applies(hidden_states.new_empty(0, first.qkv.out_features // 3 // first.num_heads))

        def layout(lengths):
            return None if flash else plan_segments(lengths, device)

        frames = frame_lengths(rows)
        marks[False] = layout(frames), max(frames), _bounds(frames)
        side = _window_side(self)
        if side:   # Qwen2.5-VL
            windows = window_lengths(rows, self.spatial_merge_size, side)
            marks[True] = layout(windows), max(windows), _bounds(windows)
    for mod in self._vlm_uniform_modules:
        mod._vlm_segments, longest, mod._vlm_bounds = marks[mod._vlm_window]
        mod._vlm_varlen = longest is not None
        if longest is not None:
            mod._vlm_max_len.fill_(longest)
    try:
        return self._vlm_tower_forward(hidden_states, grid_thw, *args, **kwargs)
    finally:
        for mod in self._vlm_uniform_modules:
            mod._vlm_segments, mod._vlm_varlen, mod._vlm_bounds = None, False, None


def _is_batchable_attention(mod: nn.Module, class_paths: tuple[str, ...]) -> bool:
    """Is ``mod`` one of the family's ``batched_vision_attention`` classes (its qualified name ends
    with one of ``class_paths``; the module path keeps another model's ``VisionAttention`` out)?"""
    path = f"{type(mod).__module__}.{type(mod).__qualname__}"
    return (any(path == c or path.endswith("." + c) for c in class_paths)
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
    """Install the batched path on every vision attention of ``model`` whose class the family names
    in ``batched_vision_attention`` (equal segments as a view, unequal ones varlen or padded; see the
    module doc); returns how many (0 for families that name none). Idempotent."""
    if torch.cuda.is_available():   # the capability read happens here, not inside a compiled block
        from vlm.train.varlen_attention import flash_applies

        flash_applies(torch.empty(0, 8, device="cuda", dtype=torch.bfloat16))
    n = 0
    if not family.batched_vision_attention:
        return 0
    for _, tower in family.component_roots(model, "vision"):
        if "_vlm_tower_forward" in tower.__dict__:
            n += len(tower._vlm_uniform_modules)
            continue
        mods = [m for m in tower.modules() if _is_batchable_attention(m, family.batched_vision_attention)]
        if not mods:
            continue
        for m, windowed in zip(mods, _windowed(tower, mods)):
            m._vlm_window = windowed
            m._vlm_segments, m._vlm_varlen, m._vlm_bounds = None, False, None
            m._vlm_max_len = torch.zeros(1, dtype=torch.int32)
            m._vlm_hf_forward = m.forward
            m.forward = MethodType(_batched_attention_forward, m)
        tower._vlm_uniform_modules = mods
        tower._vlm_tower_forward = tower.forward
        tower.forward = MethodType(_tower_forward, tower)
        n += len(mods)
    return n
