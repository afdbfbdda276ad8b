"""`vlm train` on a file mixing other tools' layouts (LLaMA-Factory with a system column and a video,
TRL with a singular image, LLaVA) and a hostile record under `on_error: skip`: a few steps run, the
bad record is counted in rejects.jsonl, nothing else is dropped."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlm.cli.main import main as vlm_main
from vlm.families import all_families

from ._tiny_run import write_config


VIDEO_VARIANTS = [v for fam in all_families().values() if fam.takes_video for v in fam.zoo_variants]


@pytest.mark.parametrize("variant", VIDEO_VARIANTS)
def test_train_on_mixed_layouts_with_video_and_a_bad_record(tmp_path, tiny_checkpoint, variant):
    from tests.data_formats.test_video import write_clip

    data = tmp_path / "data"
    data.mkdir()
    write_clip(data / "clip.mp4")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(data / "red.jpg")
    Image.new("RGB", (40, 72), (30, 30, 200)).save(data / "blue.jpg")
    records = [
        {"messages": [{"role": "user", "content": "<image>What colour?"},
                      {"role": "assistant", "content": "Red."}],
         "images": ["red.jpg"], "system": "Answer in one word."},                         # LLaMA-Factory
        {"messages": [{"role": "user", "content": "<video>What happens?"},
                      {"role": "assistant", "content": "A blue bar grows."}], "videos": ["clip.mp4"]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
         "image": "blue.jpg"},                                                              # TRL
        {"id": "x", "image": "red.jpg", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                          {"from": "gpt", "value": "Red."}]},  # LLaVA
        {"conversations": [{"from": "gpt", "value": "I speak first."},
                           {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},   # bad
    ]
    train = data / "mixed.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = write_config(tmp_path, tiny_checkpoint(variant), train, max_steps=2, save_steps=2, batch_size=2,
                       extra={"data.on_error": "skip", "data.video_max_frames": 4})
    assert vlm_main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["code"]) for r in rejects] == [(4, "turn_order")]
    summary = json.loads((out / "summary.json").read_text())
    assert [s for s, _ in summary["loss_history"]] == [1, 2]
