"""Mixing several sources with weights.

Two views of the same weights:

- :func:`mix_epoch` (map-style training): each source contributes ``weight × len`` samples per
  epoch: 2.0 repeats every record twice, 0.5 takes a seeded random half, 1.5 = all once plus a
  seeded random half again. The result is shuffled with the seed.
- :func:`interleave` (streaming): draws the next sample from source *i* with probability
  ``weight_i / Σ weight`` until the first source runs out (``"first_exhausted"``) or, restarting
  finished ones, until every source has been read once (``"all_exhausted"``).
"""

from __future__ import annotations

import random
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

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


def interleave(make_streams: Sequence[Callable[[], Iterable[T]]], weights: Sequence[float],
               seed: int = 0, stopping: str = "first_exhausted") -> Iterator[T]:
    """Weighted random interleave of streams; ``make_streams[i]()`` (re)opens stream *i*."""
    if stopping not in ("first_exhausted", "all_exhausted"):
        raise ConfigError(f"stopping must be first_exhausted or all_exhausted, got {stopping!r}")
    if len(make_streams) != len(weights) or not make_streams:
        raise ConfigError(f"{len(make_streams)} streams but {len(weights)} weights")
    rng = random.Random(seed)
    iters = [iter(make()) for make in make_streams]
    finished = [False] * len(iters)
    while True:
        i = rng.choices(range(len(iters)), weights=weights)[0]
        try:
            yield next(iters[i])
            continue
        except StopIteration:
            pass
        finished[i] = True
        if stopping == "first_exhausted" or all(finished):
            return
        iters[i] = iter(make_streams[i]())
        try:
            yield next(iters[i])
        except StopIteration:  # an empty source can never contribute
            return
