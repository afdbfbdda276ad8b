"""Score predicted captions of the synthetic scenes attribute by attribute.

:func:`parse_caption` finds which vocabulary word of each attribute a caption names (or None when it
names none, or several different ones: listing every color earns nothing). :func:`caption_scores`
gives exact-match rate (normalized text), all-attributes-correct rate and per-attribute accuracy.
Used by ``vlm.eval`` and the demo.
"""

from __future__ import annotations

import re
from typing import Sequence

from vlm.data_formats.scene_vocab import ATTRIBUTES, DEFAULT_VOCAB, SceneVocab


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, single spaces: ``"A red  circle."`` -> ``"a red circle"``."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_caption(text: str, vocab: SceneVocab = DEFAULT_VOCAB) -> dict[str, str | None]:
    """``{"shape": "circle", "color": "red", "size": "large", "position": "top left"}``-style dict."""
    norm = f" {normalize(text)} "
    found: dict[str, str | None] = {}
    for attr in ATTRIBUTES:
        hits = {w for w in vocab.words(attr) if f" {normalize(w)} " in norm}
        # "top left" also contains no other position word; longer phrases win over their parts.
        hits = {w for w in hits if not any(w != o and f" {normalize(w)} " in f" {normalize(o)} "
                                           for o in hits)}
        found[attr] = hits.pop() if len(hits) == 1 else None
    return found


def caption_scores(predictions: Sequence[str], references: Sequence[str],
                   vocab: SceneVocab = DEFAULT_VOCAB) -> dict:
    """Exact match, all-attributes match and per-attribute accuracy (fractions in [0, 1])."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n = len(references)
    if n == 0:
        return {"n": 0, "exact_match": 0.0, "all_attributes": 0.0,
                "per_attribute": {a: 0.0 for a in ATTRIBUTES}}
    exact = all_ok = 0
    per = {a: 0 for a in ATTRIBUTES}
    for pred, ref in zip(predictions, references):
        exact += normalize(pred) == normalize(ref)
        p, r = parse_caption(pred, vocab), parse_caption(ref, vocab)
        ok = {a: p[a] is not None and p[a] == r[a] for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            per[a] += ok[a]
        all_ok += all(ok.values())
    return {"n": n, "exact_match": exact / n, "all_attributes": all_ok / n,
            "per_attribute": {a: per[a] / n for a in ATTRIBUTES}}
