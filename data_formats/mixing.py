"""Mixing several sources with weights.

:func:`mix_epoch`: each source contributes ``weight × len`` samples per epoch: 2.0 repeats every
record twice, 0.5 takes a seeded random half, 1.5 = all once plus a seeded random half again. The
result is shuffled with the seed.
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

from vlm.errors import ConfigError

T = TypeVar("T")


def epoch_indices(n: int, weight: float, rng: random.Random) -> list[int]:
    """Indices into a source of ``n`` records for one epoch at ``weight`` (see module doc)."""
    whole, frac = int(weight), weight - int(weight)
    idx = list(range(n)) * whole
    extra = round(frac * n)
    if extra:
        idx += rng.sample(range(n), extra)
    return idx


def mix_epoch(sources: Sequence[Sequence[T]], weights: Sequence[float], seed: int = 0,
              shuffle: bool = True) -> list[T]:
    """One epoch's samples from several in-memory sources mixed by weight."""
    if len(sources) != len(weights):
        raise ConfigError(f"{len(sources)} sources but {len(weights)} weights")
    rng = random.Random(seed)
    mixed = [src[i] for src, w in zip(sources, weights) for i in epoch_indices(len(src), w, rng)]
    if shuffle:
        rng.shuffle(mixed)
    return mixed

