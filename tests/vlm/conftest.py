"""Fixtures for the foundation tests: a real PIL image and a one-turn chat batch per processor."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def chat_image():
    """A small real RGB image (a red square on a blue background, 72x56: not square on purpose)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (72, 56), (30, 60, 200))
    ImageDraw.Draw(img).rectangle([20, 12, 44, 36], fill=(220, 30, 30))
    return img


@pytest.fixture(scope="session")
def chat_batch(chat_image):
    """``chat_batch(processor)`` -> model inputs for an image + question + caption, with labels.

    Labels are the input ids with the image placeholder tokens masked (-100): they are inputs, not
    targets (for Mllama the image id is not even a row of lm_head)."""

    def make(processor, image_token_id: int):
        messages = [
            {"role": "user", "content": [{"type": "image", "image": chat_image},
                                         {"type": "text", "text": "Describe this image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a small red square in the center."}]},
        ]
        batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[labels == image_token_id] = -100
        batch["labels"] = labels
        return batch

    return make

