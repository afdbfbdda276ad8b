"""Small eval files for the eval tests: random-pixel PNGs and ShareGPT records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = ["a red circle on a white background", "a blue square in the corner",
            "two green triangles side by side"]


def write_eval_file(folder: Path, captions=CAPTIONS, seed: int = 0, extra_records=()) -> Path:
    """One 56x56 random image per caption + a JSONL of ShareGPT records; returns the JSONL path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i, cap in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        records.append({"id": f"img{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": cap}]})
    records.extend(extra_records)
    path = folder / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
