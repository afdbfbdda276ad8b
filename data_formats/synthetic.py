"""A deterministic synthetic captioning set: one simple shape per image, captioned by attribute.

``generate(out_dir, n=64, seed=0)`` writes ``images/00000.png ...``, ``sharegpt.json`` (LLaVA
records) and ``messages.jsonl`` (OpenAI-style records) and returns their paths. The same
``(n, seed, image_size, vocab)`` always gives byte-identical files. Used by the tests and the
training demo; choose ``vocab=VARIANT_VOCAB`` (or your own :class:`SceneVocab`) for a task the base
model has never seen.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from vlm.atomic import write_text
from vlm.data_formats.scene_vocab import ATTRIBUTES, DEFAULT_VOCAB, POSITION_CENTERS, SceneVocab


@dataclass(frozen=True)
class Scene:
    """One scene, in the vocabulary's words."""

    shape: str
    color: str
    size: str
    position: str


@dataclass
class SyntheticSet:
    """What :func:`generate` wrote."""

    root: Path
    image_dir: Path
    sharegpt_json: Path
    messages_jsonl: Path
    scenes: list[Scene]
    captions: list[str]
    vocab: SceneVocab


def sample_scene(rng: random.Random, vocab: SceneVocab = DEFAULT_VOCAB) -> Scene:
    return Scene(**{a: rng.choice(sorted(vocab.words(a))) for a in ATTRIBUTES})


def render_scene(scene: Scene, vocab: SceneVocab = DEFAULT_VOCAB, image_size: int = 64,
                 background: tuple[int, int, int] = (245, 245, 240)):
    """Draw ``scene`` on a plain background; returns a PIL RGB image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    cx, cy = (c * image_size for c in POSITION_CENTERS[vocab.positions[scene.position]])
    r = vocab.sizes[scene.size] * image_size
    fill = tuple(vocab.colors[scene.color])
    kind = vocab.shapes[scene.shape]
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return img


def _atomic_save_png(img, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def generate(out_dir: str | os.PathLike, n: int = 64, seed: int = 0, image_size: int = 64,
             vocab: SceneVocab = DEFAULT_VOCAB, question: str | None = None) -> SyntheticSet:
    """Write ``n`` scenes as PNG + ``sharegpt.json`` + ``messages.jsonl`` under ``out_dir``.

    Image paths in both files are relative (``images/00000.png``) so the default image root, the
    data file's folder, finds them.
    """
    root = Path(out_dir)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    question = question or vocab.question
    scenes, captions, sharegpt, messages = [], [], [], []
    for i in range(n):
        scene = sample_scene(rng, vocab)
        caption = vocab.caption(scene)
        rel = f"images/{i:05d}.png"
        _atomic_save_png(render_scene(scene, vocab, image_size), root / rel)
        scenes.append(scene)
        captions.append(caption)
        sharegpt.append({"id": f"scene-{i:05d}", "image": rel, "attributes": asdict(scene),
                         "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                           {"from": "gpt", "value": caption}]})
        messages.append({"id": f"scene-{i:05d}", "images": [rel],
                         "messages": [{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": question}]},
                                      {"role": "assistant", "content": caption}]})
    sharegpt_path, messages_path = root / "sharegpt.json", root / "messages.jsonl"
    write_text(sharegpt_path, json.dumps(sharegpt, indent=1) + "\n")
    write_text(messages_path, "".join(json.dumps(m) + "\n" for m in messages))
    return SyntheticSet(root, image_dir, sharegpt_path, messages_path, scenes, captions, vocab)
