"""Helpers for the patch tests: a tiny model + one image-text batch with labels, per zoo variant."""

from __future__ import annotations

import numpy as np
import torch


def load_tiny(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(path)
    return model, proc


def batch_for(model, proc, seed: int = 0):
    """Two image-caption samples through the checkpoint's own processor; labels mask the prompt."""
    from PIL import Image

    from vlm.families import family_for_config

    fam = family_for_config(model.config)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8))
              for i in range(2)]
    texts = [f"{fam.image_placeholder}\nDescribe it: a red cat sat on the mat number {i}"
             for i in range(2)]
    if fam.images_per_sample:
        images = [[im] for im in images]
    enc = proc(text=texts, images=images, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[:, : labels.shape[1] // 3] = -100
    if "attention_mask" in enc:
        labels[enc["attention_mask"] == 0] = -100
    enc["labels"] = labels
    return dict(enc)
