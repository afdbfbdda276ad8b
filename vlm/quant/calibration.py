"""Calibration batches for the sensitivity analysis and the agreement check.

A calibration set is a few image-text samples rendered with the model's own processor and chat
template (so the vision tower, projector and language model all run):

- ``None``: a synthetic set drawn here (coloured shapes on plain backgrounds with a caption that
  names them), reproducible for a seed;
- a path or source that ``vlm.data_formats`` reads (JSON/JSONL/parquet, ShareGPT or messages),
  or a dict ``{"path", "image_root", "on_error"}`` (what training passes: the data section's
  image root and bad-record policy hold for calibration too; skipped records are counted and said);
- a list of ready processor outputs (dicts of tensors), used as they are.
"""

from __future__ import annotations

import random
from typing import Any

from vlm.errors import ConfigError

_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
            "yellow": (230, 210, 40), "white": (245, 245, 245), "black": (15, 15, 15)}
_SHAPES = ("circle", "square", "triangle")


def synthetic_samples(n: int, seed: int = 0, size: int = 64) -> list[tuple[Any, str, str]]:
    """``n`` (PIL image, question, caption) triples: one shape of one colour on another colour."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fg, bg = rng.sample(sorted(_COLOURS), 2)
        shape = rng.choice(_SHAPES)
        img = Image.new("RGB", (size, size), _COLOURS[bg])
        d = ImageDraw.Draw(img)
        a, b = rng.randint(4, size // 3), rng.randint(2 * size // 3, size - 4)
        if shape == "circle":
            d.ellipse((a, a, b, b), fill=_COLOURS[fg])
        elif shape == "square":
            d.rectangle((a, a, b, b), fill=_COLOURS[fg])
        else:
            d.polygon(((a, b), (b, b), ((a + b) // 2, a)), fill=_COLOURS[fg])
        out.append((img, "Describe the image.", f"A {fg} {shape} on a {bg} background."))
    return out


def _messages(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def render(processor, messages: list[dict], images: list) -> dict:
    """One processor batch (batch size 1) from chat messages and their PIL images."""
    from vlm.data_formats.chat_render import adds_bos

    text = processor.apply_chat_template(messages, tokenize=False)
    # one BOS, as in training: none added where the template wrote it
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt",
                              "add_special_tokens": adds_bos(processor.tokenizer, text)}
    if images:
        kwargs["images"] = [images]
    return dict(processor(**kwargs))


def _from_source(source: Any, processor, n: int) -> list[dict]:
    try:
        from vlm.data_formats.images import open_image
        from vlm.data_formats.reader import iter_conversations
    except ImportError as e:  # pragma: no cover - data_formats ships with the project
        raise ConfigError(f"calibration data {source!r} needs vlm.data_formats: {e}") from e
    from vlm.data_formats.rejects import RejectLog

    image_root, on_error = None, "raise"
    if isinstance(source, dict):
        source, image_root, on_error = (source.get("path"), source.get("image_root"),
                                        source.get("on_error", "raise"))
    rejects = RejectLog()
    batches = []
    for conv in iter_conversations(source, image_root=image_root, on_error=on_error, rejects=rejects):
        images = [open_image(conv.images[i], conv.image_root) for i in conv.image_order()]
        batches.append(render(processor, conv.to_messages(), images))
        if len(batches) >= n:
            break
    if rejects.total:
        print(f"calibration: {rejects.total} bad record(s) skipped in {source} (on_error: skip); "
              f"first: {rejects.errors[0]}")
    if not batches:
        raise ConfigError(f"calibration data {source!r} holds no usable record")
    return batches


def calibration_batches(calibration: Any, processor, *, n: int = 4, seed: int = 0) -> list[dict]:
    """``n`` calibration batches (see the module docstring for what ``calibration`` may be)."""
    if calibration is None:
        if processor is None:
            raise ConfigError("calibration: a processor is needed to render the synthetic set")
        return [render(processor, _messages(q, a), [img]) for img, q, a in synthetic_samples(n, seed)]
    if isinstance(calibration, (list, tuple)) and calibration and all(
            isinstance(b, dict) and "input_ids" in b for b in calibration):
        return [dict(b) for b in calibration]
    if processor is None:
        raise ConfigError("calibration: a processor is needed to render calibration records")
    return _from_source(calibration, processor, n)
