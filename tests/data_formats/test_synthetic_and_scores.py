"""Synthetic scenes are deterministic and parse back; caption scoring per attribute."""

from __future__ import annotations

import hashlib

from vlm.data_formats import read_conversations
from vlm.data_formats.caption_attributes import caption_scores, parse_caption
from vlm.data_formats.scene_vocab import VARIANT_VOCAB
from vlm.data_formats.synthetic import generate


def _digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_is_deterministic_and_readable(tmp_path):
    a = generate(tmp_path / "a", n=6, seed=5, image_size=48)
    b = generate(tmp_path / "b", n=6, seed=5, image_size=48)
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root) != _digest(generate(tmp_path / "c", n=6, seed=6, image_size=48).root)
    for path in (a.sharegpt_json, a.messages_jsonl):
        convs = read_conversations(path)
        assert [c.turns[-1].text for c in convs] == a.captions
    for scene, caption in zip(a.scenes, a.captions):
        assert parse_caption(caption) == vars(scene)


def test_variant_task_and_scores(tmp_path):
    v = generate(tmp_path, n=4, seed=0, vocab=VARIANT_VOCAB)
    assert all(c.count(",") == 3 for c in v.captions)
    assert parse_caption(v.captions[0], VARIANT_VOCAB) == vars(v.scenes[0])
    s = caption_scores(["A large red circle in the top left.", "a small blue square in the center",
                        "red blue green circle"],
                       ["a large red circle in the top left", "a large blue square in the top right",
                        "a small red circle in the center"])
    assert s["exact_match"] == 1 / 3 and s["all_attributes"] == 1 / 3
    assert s["per_attribute"] == {"shape": 1.0, "color": 2 / 3, "size": 1 / 3, "position": 1 / 3}
