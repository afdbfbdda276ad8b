"""Length-grouped batching: batches of similar length waste less compute on padding.

Each epoch (seeded by ``seed + epoch``): shuffle all indices, cut them into *megabatches* of
``batch_size × group_factor`` samples, sort each megabatch by length (longest first), and cut it
into batches; then shuffle the batch order, keeping the batch holding the longest sample first so
an out-of-memory shows up at step 1. Works as a ``batch_sampler`` of a ``DataLoader`` (with any
number of workers: it yields only indices). Call :meth:`set_epoch` each epoch for a new order.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

from vlm.errors import ConfigError


class LengthGroupedSampler:
    def __init__(self, lengths: Sequence[int], batch_size: int, *, group_factor: int = 16,
                 seed: int = 0, drop_last: bool = False, shuffle: bool = True):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_factor = max(1, group_factor)
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        mega = self.batch_size * self.group_factor
        batches = []
        for start in range(0, len(order), mega):
            group = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [group[b:b + self.batch_size] for b in range(0, len(group), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle and batches:
            longest = max(range(len(batches)), key=lambda k: max(self.lengths[i] for i in batches[k]))
            first = batches.pop(longest)
            rng.shuffle(batches)
            batches.insert(0, first)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
