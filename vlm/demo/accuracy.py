"""Caption accuracy on held-out synthetic scenes: exact match and per-attribute accuracy.

Held-out means scenes drawn with a seed no training set uses; captions come from greedy decoding
(``vlm.eval.generation``) with the task's own question as the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class CaptionItem:
    image: Any
    prompt: str
    reference: str


def heldout_items(out_dir: str | Path, vocab, n: int, seed: int, image_size: int) -> list[CaptionItem]:
    from PIL import Image

    from vlm.data_formats.synthetic import generate

    data = generate(out_dir, n=n, seed=seed, image_size=image_size, vocab=vocab)
    return [CaptionItem(Image.open(data.image_dir / f"{i:05d}.png").convert("RGB"), vocab.question, cap)
            for i, cap in enumerate(data.captions)]


def caption_accuracy(model, processor, items: list[CaptionItem], vocab, *, batch_size: int = 16,
                     max_new_tokens: int = 24) -> dict:
    """Greedy captions for ``items`` scored against their references in ``vocab``'s words."""
    from vlm.data_formats.caption_attributes import caption_scores
    from vlm.eval.generation import GenerationSettings, generate_captions

    was_training = model.training
    model.eval()
    res = generate_captions(model, processor, items,
                            GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size))
    if was_training:
        model.train()
    scores = caption_scores(res.captions, [it.reference for it in items], vocab)
    scores["examples"] = [{"reference": it.reference, "caption": c}
                          for it, c in list(zip(items, res.captions))[:5]]
    return scores
