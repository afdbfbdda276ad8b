"""Where the samples of a packed batch start: the one boundary rule, and the forms the kernels take.

A packed batch (:mod:`vlm.data_formats.packing`) is B rows of L tokens whose ``position_ids`` restart
at 0 where each sample starts. Flattened to T = B·L tokens, the samples are the segments
[c_j, c_{j+1}) of the cumulative boundaries 0 = c_0 < c_1 < … < c_n = T, where a segment starts at
every row start and wherever a position does not follow its predecessor by 1. A row's padding tail
(positions 0, 1, … again) is a segment of its own.

The packing collator applies the rule on CPU, in the DataLoader workers, and ships the results with
the batch; the model side (:mod:`vlm.train.packed_forward`) applies the same functions to a batch
that arrives without them.
"""

from __future__ import annotations

import torch


def segment_boundaries(text_positions: torch.Tensor) -> list[int]:
    """Cumulative boundaries over the flattened (B, L) positions: a segment starts at every row
    start and wherever a position does not follow its predecessor by 1 (where packing restarts it).
    Reads the positions on the host (a device sync when they live on a GPU)."""
    flat = text_positions.detach().reshape(-1).cpu()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] - flat[:-1] != 1
    starts[::text_positions.shape[-1]] = True
    return starts.nonzero().flatten().tolist() + [int(flat.numel())]


def padded_boundaries(bounds: list[int], device) -> torch.Tensor:
    """``bounds`` as int32 on ``device`` (``cu_seqlens`` of the varlen kernels), padded by repeating
    the end (empty segments) to a power of two entries, so that compiled layers see few distinct
    lengths (one dynamic recompile at most)."""
    size = 1 << max(len(bounds) - 1, 1).bit_length()
    return torch.tensor(bounds + [bounds[-1]] * (size - len(bounds)), dtype=torch.int32, device=device)


def max_segment_length(bounds: list[int], row_length: int) -> int:
    """The longest segment rounded up to 256 tokens (at most the row): the varlen kernels size their
    grid by it, and rounding keeps compiled layers on one value for most batches."""
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return min(row_length, -(-longest // 256) * 256)


def row_spans(bounds: list[int], row_length: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample, from the flattened boundaries of
    :func:`segment_boundaries` (a segment never crosses a row)."""
    return [(a // row_length, a % row_length, a % row_length + (b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
