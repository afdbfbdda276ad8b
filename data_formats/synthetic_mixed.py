"""A synthetic training set shaped like users' data, for end-to-end speed runs (``benchmarks/train_e2e.py``).

``generate(out_dir, n=512, seed=0)`` writes JPEG images and ``train.json`` (LLaVA ``conversations``
records) with the mix that makes real batches ragged:

- image sizes and aspect ratios from 224 × 224 up to 1344 × 1008, with portrait and landscape
  extremes (up to 3 : 1) — the processor's pixel limits then give each image its own token count;
- 10 % of the records carry 2–3 images (at most 640 × 480 each, so their image blocks fit a
  2,048-token sample), ~3 % none (text only);
- 1–6 user/assistant turns; first answers from 3 to ~600 words, most of them short, a long tail of
  long ones (40 % 3–30 words, 40 % 30–200, 20 % 200–600); follow-up answers 3–80 words.

Every answer describes the record's drawn scenes (shape, colour, size, position in
:data:`~vlm.data_formats.scene_vocab.DEFAULT_VOCAB` words) and pads with sentences about them, so a
model can learn something, and every tool learns the same thing from the same files. The same
``(n, seed, scale)`` gives byte-identical files. ``scale`` shrinks every image side (tiny CPU runs).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from vlm.atomic import write_text
from vlm.data_formats.scene_vocab import DEFAULT_VOCAB
from vlm.data_formats.synthetic import render_scene, sample_scene

# (width, height): square, 4:3, 16:9, 3:1 and portrait counterparts, 224 up to 1344 x 1008
IMAGE_SIZES = ((224, 224), (336, 336), (448, 448), (640, 480), (480, 640), (800, 600), (1024, 768),
               (768, 1024), (1280, 720), (720, 1280), (1344, 1008), (1008, 1344), (1344, 448),
               (448, 1344), (896, 896))
# multi-image records use the smaller sizes, so that their image blocks fit a 2,048-token sample
MULTI_IMAGE_SIZES = IMAGE_SIZES[:5]
QUESTIONS = ("Describe the image.", "What do you see here?", "Where is the shape, and how large is it?",
             "Give a detailed description.", "What colour is the main object?", "Compare the pictures.")
FILLER = ("The background is plain and evenly lit.", "Nothing else appears in the frame.",
          "The edges of the {shape} are sharp and clean.", "Its {color} colour stands out clearly.",
          "The {shape} sits in the {position}, away from the other corners.",
          "Relative to the whole picture the {shape} is {size}.", "There is no text in the image.",
          "The composition is simple, with a single object.", "A viewer would notice the {color} {shape} first.")


@dataclass
class MixedSet:
    root: Path
    train_json: Path
    records: int
    images: int


def _answer_words(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.4:
        return rng.randint(3, 30)
    if r < 0.8:
        return rng.randint(30, 200)
    return rng.randint(200, 600)


def _answer(rng: random.Random, scene, words: int) -> str:
    caption = DEFAULT_VOCAB.caption(scene)
    parts, count = [caption[0].upper() + caption[1:] + "."], len(caption.split())
    fields = {"shape": scene.shape, "color": scene.color, "size": scene.size, "position": scene.position}
    while count < words:
        sentence = rng.choice(FILLER).format(**fields)
        parts.append(sentence)
        count += len(sentence.split())
    return " ".join(" ".join(parts).split()[:max(words, 3)])


def _save_jpeg(img, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="JPEG", quality=85)
    os.replace(tmp, path)


def generate(out_dir: str | os.PathLike, n: int = 512, seed: int = 0, scale: float = 1.0) -> MixedSet:
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records, n_images = [], 0
    for i in range(n):
        r = rng.random()
        k = 0 if r < 0.03 else (rng.randint(2, 3) if r < 0.13 else 1)
        scenes, rels = [], []
        for j in range(k):
            w, h = rng.choice(IMAGE_SIZES if k == 1 else MULTI_IMAGE_SIZES)
            w, h = max(28, int(w * scale)), max(28, int(h * scale))
            scene = sample_scene(rng)
            side = min(w, h)
            img = render_scene(scene, DEFAULT_VOCAB, side).resize((w, h))
            rel = f"images/{i:05d}_{j}.jpg"
            _save_jpeg(img, root / rel)
            scenes.append(scene)
            rels.append(rel)
            n_images += 1
        turns = rng.randint(1, 6)
        conv = []
        for t in range(turns):
            scene = scenes[t % len(scenes)] if scenes else sample_scene(rng)
            question = rng.choice(QUESTIONS)
            if t == 0 and rels:
                question = "\n".join(["<image>"] * len(rels) + [question])
            conv.append({"from": "human", "value": question})
            words = _answer_words(rng) if t == 0 else rng.randint(3, 80)   # follow-ups are shorter
            conv.append({"from": "gpt", "value": _answer(rng, scene, words)})
        record = {"id": f"mixed-{i:05d}", "conversations": conv}
        if len(rels) == 1:
            record["image"] = rels[0]
        elif rels:
            record["image"] = rels
        records.append(record)
    path = root / "train.json"
    write_text(path, json.dumps(records, indent=0) + "\n")
    return MixedSet(root, path, len(records), n_images)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0)
    a = p.parse_args(argv)
    s = generate(a.out_dir, n=a.n, seed=a.seed, scale=a.scale)
    print(f"{s.records} records, {s.images} images -> {s.train_json}")


if __name__ == "__main__":
    main()
