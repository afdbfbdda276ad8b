"""Token-budget batching and padding-free packing.

Two ways to fill a micro-batch of at most ``max_tokens`` tokens:

- **packed** (``plan_packs``): several samples share one row, back to back. A row holding samples of
  ``n_1, n_2, ... n_k`` tokens computes ``sum(n_i)`` tokens plus a short tail that rounds the row
  up to a length bucket. Each sample keeps its own positions (``position_ids`` restart at 0 where a
  sample starts) and attention never crosses a sample boundary; the model side of that lives in
  :mod:`vlm.train.packed_forward`. Samples are placed first-fit-decreasing inside shuffled windows,
  so rows are nearly full while the data order stays random across windows.
- **padded** (``plan_padded_batches``): for families that cannot pack (Mllama: its
  ``cross_attention_mask`` ties text rows to per-sample image tiles), samples of similar length are
  grouped so that ``rows × longest ≤ max_tokens``; the collator pads as usual.

:class:`PackingCollator` turns a list of groups (lists of conversations) into one batch by calling
:class:`~vlm.data_formats.collator.VisionChatCollator` once on all of them (one processor call: the
image tensors stay in the order their tokens appear) and then laying each group's rows end to end.

The collator also ships what the model side would otherwise work out from the positions on the GPU
(a device→host read, and for M-RoPE families the model's rope index: many small kernels and more
reads): the samples' boundaries as the varlen kernels take them (``packed_cu_seqlens``, int32 CPU
tensor; ``packed_max_seqlen``, a plain int so that no device placement moves it to the GPU: the
kernels read it on the host) and, given the model's rule (``mrope_positions``), the (4, B, L)
M-RoPE positions (``packed_mrope_position_ids``); and host copies, as plain lists, of the small
tensors the model's code reads element by element on the host (``packed_host_inputs``: image grids,
image sizes, the boundaries), so that the model side can hand transformers host tensors there
instead of device ones whose every read waits for the GPU. All are computed on CPU, in the
DataLoader workers when there are any, by the one boundary rule of :mod:`vlm.data_formats.segments`;
:mod:`vlm.train.packed_forward` pops them before the model's forward.

Loss equivalence: labels are shifted inside the model (the token at ``t`` predicts the label at
``t+1``), so the first label of every packed sample is set to -100: the last token of sample ``i``
must not be trained to predict the first token of sample ``i+1``. Unpacked, that first label is never
used either, so the packed row's summed loss is exactly the sum of the samples' own losses.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from vlm.data_formats.segments import max_segment_length, padded_boundaries, segment_boundaries
from vlm.errors import ConfigError

IGNORE_INDEX = -100
# per-token keys laid end to end when packing (value: fill of the tail that rounds a row up)
PACKED_KEYS = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0,
               "token_type_ids": 0}
# what a packed batch carries besides the model's inputs (vlm.train.packed_forward pops them)
CU_SEQLENS = "packed_cu_seqlens"            # (2^k,) int32: cumulative sample boundaries, end repeated
MAX_SEQLEN = "packed_max_seqlen"            # int: longest sample rounded up (segments.max_segment_length)
MROPE_POSITIONS = "packed_mrope_position_ids"   # (4, B, L): text positions, then M-RoPE t/h/w per sample
# {name: nested list}: host copies of what the model reads on the host (see HOST_COPIED); lists, so
# that no device placement moves them to the GPU
HOST_INPUTS = "packed_host_inputs"
SEGMENT_KEYS = (CU_SEQLENS, MAX_SEQLEN, MROPE_POSITIONS, HOST_INPUTS)
# the small input tensors transformers' vision code reads element by element (image grids, image
# sizes: split sizes, per-image loops), and the boundaries (the per-segment reference attention)
HOST_COPIED = ("image_grid_thw", "video_grid_thw", "image_sizes", CU_SEQLENS)
WINDOW = 1000   # samples per first-fit window: rows fill well, order stays random beyond a window


def packing_refusal(family) -> str | None:
    """Why ``family`` cannot pack, or None when it can (the reason is logged by the caller)."""
    if family.cross_attention_images:
        return (f"{family.name}: images enter through cross-attention, whose cross_attention_mask "
                "pairs every text token with its own sample's image tiles; packed rows would need a "
                "per-sample cross-attention mask that transformers does not build")
    return None


def _windows(n: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + WINDOW] for i in range(0, n, WINDOW)]


def _check_fits(lengths: Sequence[int], max_tokens: int) -> None:
    if max_tokens < 1:
        raise ConfigError(f"max_tokens_per_batch must be >= 1, got {max_tokens}")
    longest = max(lengths, default=0)
    if longest > max_tokens:
        raise ConfigError(f"a sample has {longest} tokens, more than max_tokens_per_batch={max_tokens}: "
                          "set data.max_tokens_per_batch >= data.max_length")


def plan_packs(lengths: Sequence[int], max_tokens: int, *, seed: int = 0) -> list[list[int]]:
    """Groups of sample indices whose lengths sum to at most ``max_tokens`` (first-fit decreasing
    inside shuffled windows of :data:`WINDOW` samples). Deterministic for a given ``seed``."""
    _check_fits(lengths, max_tokens)
    packs: list[list[int]] = []
    for window in _windows(len(lengths), seed):
        bins: list[list[int]] = []
        room: list[int] = []
        for i in sorted(window, key=lambda j: -lengths[j]):
            for b, free in enumerate(room):
                if lengths[i] <= free:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(max_tokens - lengths[i])
        packs += bins
    return packs


def plan_padded_batches(lengths: Sequence[int], max_tokens: int, *, seed: int = 0) -> list[list[int]]:
    """Groups of sample indices with ``len(group) × longest ≤ max_tokens``: length-sorted inside
    shuffled windows, so each group is padded to a length near all of its samples'."""
    _check_fits(lengths, max_tokens)
    groups: list[list[int]] = []
    for window in _windows(len(lengths), seed):
        current: list[int] = []
        for i in sorted(window, key=lambda j: -lengths[j]):
            longest = lengths[current[0]] if current else lengths[i]
            if current and (len(current) + 1) * longest > max_tokens:
                groups.append(current)
                current = []
            current.append(i)
        if current:
            groups.append(current)
    return groups


def bucket_length(n: int, max_tokens: int, buckets: int, multiple: int = 64) -> int:
    """The row length ``n`` tokens are padded to: the smallest of ``buckets`` evenly spaced lengths
    (``max_tokens / buckets`` apart, each a multiple of ``multiple``) that holds them. Few lengths =
    few shapes for torch.compile and CUDA graphs; spacing bounds the padding of a row."""
    step = -(-max(1, max_tokens // max(1, buckets)) // multiple) * multiple
    return max(step, -(-n // step) * step)


def padding_fraction(rows: Sequence[int], max_tokens: int, buckets: int, multiple: int = 64) -> float:
    """Share of the tokens computed that are padding when rows of ``rows`` tokens are bucketed."""
    computed = sum(bucket_length(n, max_tokens, buckets, multiple) for n in rows)
    return 1 - sum(rows) / computed if computed else 0.0


class PackingCollator:
    """``collator(groups) -> batch``: each group (a list of conversations, from
    :func:`plan_packs`) becomes one row; ``packed=False`` collates the groups' samples as one
    ordinary padded batch (token-budget batching without packing).

    Packed batches carry ``position_ids`` (B, L): per-sample positions 0..n-1, the tail that rounds
    the row up to its bucket counted as one more sample (label -100, ``attention_mask`` 0). The
    ``attention_mask`` marks real tokens for counting; :mod:`vlm.train.packed_forward` drops it in
    the model so that transformers derives the block-diagonal mask from the position resets.
    They also carry the :data:`SEGMENT_KEYS`: the boundaries, and with ``mrope_positions`` (a
    callable ``(batch, bounds) -> (4, B, L)``, the model's rule:
    :func:`vlm.train.packed_forward.collator_positions`) the M-RoPE positions.
    """

    def __init__(self, collator, *, packed: bool, max_tokens: int, buckets: int = 16, multiple: int = 64,
                 mrope_positions=None):
        self.collator = collator
        self.packed = packed
        self.max_tokens = int(max_tokens)
        self.buckets = int(buckets)
        self.multiple = int(multiple)
        self.mrope_positions = mrope_positions

    def __getattr__(self, name: str) -> Any:   # plan(), sample_length() ... of the wrapped collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, groups: Sequence[Any]) -> dict[str, Any]:
        groups = [list(g) if isinstance(g, (list, tuple)) else [g] for g in groups]
        flat = [c for g in groups for c in g]
        if not flat:
            raise ValueError("empty batch")
        batch = self.collator(flat)
        if not self.packed:
            return batch
        return self.pack(batch, [len(g) for g in groups])

    def pack(self, batch: dict[str, Any], group_sizes: Sequence[int]) -> dict[str, Any]:
        """Lay the rows of a padded ``batch`` end to end, ``group_sizes[k]`` rows per packed row."""
        real = batch["attention_mask"].sum(dim=1).tolist()
        rows: list[dict[str, torch.Tensor]] = []
        start = 0
        for size in group_sizes:
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in PACKED_KEYS if k in batch}
            positions = []
            for r in range(start, start + size):
                n = int(real[r])
                for key in parts:
                    piece = batch[key][r, :n]
                    if key == "labels":
                        piece = piece.clone()
                        piece[0] = IGNORE_INDEX   # no prediction across the boundary
                    parts[key].append(piece)
                positions.append(torch.arange(n))
            row = {k: torch.cat(v) for k, v in parts.items()}
            row["position_ids"] = torch.cat(positions)
            rows.append(row)
            start += size
        target = max(bucket_length(int(r["input_ids"].numel()), self.max_tokens, self.buckets,
                                   self.multiple) for r in rows)
        pad_id = self.collator.pad_token_id
        out = {k: v for k, v in batch.items() if k not in PACKED_KEYS}
        for key in [*rows[0]]:
            fill = pad_id if key == "input_ids" else PACKED_KEYS.get(key, 0)
            padded = []
            for row in rows:
                t = row[key]
                tail = target - t.numel()
                extra = torch.arange(tail) if key == "position_ids" else torch.full((tail,), fill, dtype=t.dtype)
                padded.append(torch.cat([t, extra.to(t.dtype)]))
            out[key] = torch.stack(padded)
        return self.add_segments(out)

    def add_segments(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with the :data:`SEGMENT_KEYS` its ``position_ids`` imply."""
        bounds = segment_boundaries(batch["position_ids"])   # a CPU tensor here: no device sync
        batch[CU_SEQLENS] = padded_boundaries(bounds, "cpu")
        batch[MAX_SEQLEN] = max_segment_length(bounds, batch["position_ids"].shape[-1])
        if self.mrope_positions is not None:
            batch[MROPE_POSITIONS] = self.mrope_positions(batch, bounds)
        batch[HOST_INPUTS] = {k: batch[k].tolist() for k in HOST_COPIED if isinstance(batch.get(k), torch.Tensor)}
        return batch
