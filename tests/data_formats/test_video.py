"""Video records (LLaMA-Factory `videos`, Qwen2-VL-Finetune `video`, typed video parts): frames
sampled by fps / max frames from the container header, expanded to the family's video tokens by the
processor, trained on the families that take video; the others refuse them by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlm.data_formats import problems
from vlm.data_formats.check import check_data
from vlm.data_formats.collator import IGNORE_INDEX, VisionChatCollator
from vlm.data_formats.conversation import ImageRef
from vlm.data_formats.reader import read_conversations
from vlm.data_formats.records import parse_record
from vlm.data_formats.video import VideoSampling, patch_times, read_video, video_header
from vlm.errors import DataError
from vlm.zoo import VARIANTS

FRAMES, FPS = 12, 4          # a 3-second clip


def write_clip(path: Path, n: int = FRAMES, fps: int = FPS, w: int = 64, h: int = 48) -> Path:
    """Frame i has red = 20·i everywhere (so a decoded frame says which one it is)."""
    import av

    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:, :, 0] = 20 * i
        arr[:, : (i * 5) % w + 1, 2] = 200
        for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    write_clip(root / "clip.mp4")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    return root


LAYOUTS = {
    "llamafactory": {"messages": [{"role": "user", "content": "<video>What happens?"},
                                  {"role": "assistant", "content": "A blue bar grows to the right."}],
                     "videos": ["clip.mp4"]},
    "qwen2vl_finetune": {"id": "v1", "video": "clip.mp4",
                         "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                           {"from": "gpt", "value": "A blue bar grows to the right."}]},
    "typed_part": {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                                             {"type": "text", "text": "What happens?"}]},
                                {"role": "assistant", "content": [{"type": "text", "text": "A bar grows."}]}]},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_video_layouts_parse(clip_dir, layout):
    conv = read_conversations([LAYOUTS[layout]], image_root=str(clip_dir))[0]
    assert [v.value for v in conv.videos] == ["clip.mp4"] and conv.media_order() == [("video", 0)]
    assert conv.to_messages()[0]["content"][0] == {"type": "video"}


def test_patch_times_are_the_mean_of_each_patch_first_and_last_frame():
    assert patch_times([0, 2, 4, 7, 9, 11], 4.0, 2) == [0.25, 1.375, 2.5]
    assert patch_times([0, 4, 8], 4.0, 2) == [0.5, 2.0]          # the last patch repeats frame 8
    assert patch_times([3], 2.0, 2) == [1.5]


def test_sampling_follows_fps_and_max_frames(clip_dir):
    ref = ImageRef("path", "clip.mp4")
    header = video_header(ref, clip_dir)
    assert (header.total_frames, header.native_fps, header.height, header.width) == (12, 4.0, 48, 64)
    # 3 s at 2 fps = 6 frames, evenly spaced over indices 0..11
    assert header.indices(VideoSampling(2.0, 32)) == [0, 2, 4, 7, 9, 11]
    assert header.indices(VideoSampling(2.0, 4)) == [0, 4, 7, 11]
    assert header.indices(VideoSampling(100.0, 32)) == list(range(12))
    frames, meta = read_video(ref, clip_dir, VideoSampling(2.0, 32))
    assert frames.shape == (6, 48, 64, 3) and frames.dtype == np.uint8
    red = frames[..., 0].reshape(6, -1).mean(axis=1)
    assert np.allclose(red, [20 * i for i in (0, 2, 4, 7, 9, 11)], atol=8), red
    assert meta["frames_indices"] == [0, 2, 4, 7, 9, 11] and meta["fps"] == 4.0


def _collator(tiny_checkpoint, variant, **kwargs):
    from transformers import AutoProcessor

    from vlm.families import family_for_config
    from vlm.load import load_config

    path = tiny_checkpoint(variant)
    return path, VisionChatCollator(AutoProcessor.from_pretrained(str(path)),
                                    family_for_config(load_config(path)), pad_to_multiple_of=1, **kwargs)




@pytest.mark.parametrize("variant", list(VARIANTS))
def test_families_whose_model_takes_video_declare_it(tiny_checkpoint, variant):
    """A checkpoint with a video token and a video processor trains on video records: the family
    must not refuse what the model can take."""
    from transformers import AutoProcessor

    from vlm.families import family_for_config
    from vlm.load import load_config

    path = tiny_checkpoint(variant)
    config = load_config(path)
    processor = AutoProcessor.from_pretrained(str(path))
    model_takes_video = (getattr(config, "video_token_id", None) is not None
                         and getattr(processor, "video_processor", None) is not None)
    assert family_for_config(config).takes_video == model_takes_video


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_video_trains_or_is_refused_by_name(clip_dir, tiny_checkpoint, variant):
    from transformers import AutoModelForImageTextToText

    path, collator = _collator(tiny_checkpoint, variant, video_fps=2.0, video_max_frames=32)
    conv = read_conversations([LAYOUTS["llamafactory"]], image_root=str(clip_dir))[0]
    if not collator.family.takes_video:
        with pytest.raises(DataError) as e:
            collator.plan(conv)
        assert e.value.code == problems.VIDEO_UNSUPPORTED and collator.family.name in str(e.value)
        return
    plan = collator.plan(conv)
    batch = collator([conv])
    # 6 frames -> 3 temporal patches of 2 frames; the processor's resize sets the h x w grid
    (t, h, w), = batch["video_grid_thw"].tolist()
    merge = collator.processor.video_processor.merge_size
    assert t == 3
    video_tokens = batch["input_ids"][0] == collator.video_token_id
    assert video_tokens.sum().item() == t * h * w // merge ** 2
    block = plan.image_counts[0]    # the whole video block is an input, never a target
    start = int(video_tokens.nonzero()[0])
    wrap = collator.family.video_frame_wrap
    if wrap is None:                # the placeholder repeated in place
        assert block == t * h * w // merge ** 2 and bool(video_tokens[start:start + block].all())
    else:                           # each patch written at its time: frames 0,2 | 4,7 | 9,11 at 4 fps
        start -= len(collator.tokenizer(wrap.timestamp.format(0.25) + wrap.before,
                                        add_special_tokens=False)["input_ids"])
        text = collator.tokenizer.decode(batch["input_ids"][0, start:start + block])
        assert text.startswith("<0.2 seconds>") and "<1.4 seconds>" in text and "<2.5 seconds>" in text
        assert text.count(wrap.before) == t and text.endswith(wrap.after)
    assert (batch["labels"][0][start:start + block] == IGNORE_INDEX).all()
    assert (batch["labels"][0] != IGNORE_INDEX).sum() > 0
    assert (batch["mm_token_type_ids"][0][video_tokens] == 2).all()
    if "second_per_grid_ts" in batch:    # Qwen2.5-VL: 2 frames per patch at 6/12·4 = 2 fps -> 1 s
        assert torch.allclose(torch.as_tensor(batch["second_per_grid_ts"], dtype=torch.float32),
                              torch.tensor([1.0]))
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0   # the frames reached the tower


def test_broken_video_and_video_in_reply_are_named(clip_dir, tmp_path):
    import json

    good = LAYOUTS["llamafactory"]
    broken = {**good, "videos": ["broken.mp4"]}
    in_reply = {"messages": [{"role": "user", "content": "What happens?"},
                             {"role": "assistant", "content": "<video>"}], "videos": ["clip.mp4"]}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (good, broken, in_reply)))
    report = check_data([str(data)], image_root=str(clip_dir))
    assert [(e.index, e.code) for e in report.rejects.errors] == [
        (1, problems.CORRUPT_VIDEO), (2, problems.IMAGE_IN_REPLY)]
    with pytest.raises(DataError, match="'video' and 'videos'"):
        parse_record({**LAYOUTS["qwen2vl_finetune"], "videos": ["clip.mp4"]})


def test_hostile_video_paths_are_named_as_videos(clip_dir, tmp_path):
    """The hostile paths of the image side, given as videos: each one reject naming the file, the
    record and the video (not "image"), counted under the skip policy while the good records stay."""
    import json
    import os

    root = tmp_path / "root"
    root.mkdir()
    (root / "clip.mp4").write_bytes((clip_dir / "clip.mp4").read_bytes())
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    hostile = {"missing.mp4": "video file 'missing.mp4' not found",
               "a\x00.mp4": "video path 'a\\x00.mp4' contains a NUL byte",
               "x" * 5000 + ".mp4": "video path 'xxx",
               "loop_a": "video path 'loop_a' cannot be looked up",
               "/etc/hostname": "video path '/etc/hostname' escapes the image root",
               "https://example.com/v.mp4": "videos are never downloaded",
               7: "video[0] must be a video file path string, got int"}
    good = LAYOUTS["qwen2vl_finetune"]
    records = [good] + [{**good, "video": [v]} for v in hostile] + [good]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = check_data([str(data)], image_root=str(root))
    assert report.files[str(data)]["valid"] == 2 and report.rejects.total == len(hostile)
    for err, (index, expected) in zip(report.rejects.errors, enumerate(hostile.values(), start=1)):
        assert err.index == index and f"{data}, record {index}" in str(err), str(err)
        assert expected in str(err) and "image path" not in str(err) and "image file" not in str(err), str(err)


def test_preview_counts_video_tokens_as_video(clip_dir, tmp_path, tiny_checkpoint, capsys):
    """`vlm data preview` of a record with an image and a video: each kind counted and shown by name."""
    import json

    from PIL import Image

    from vlm.cli.main import main

    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    (tmp_path / "clip.mp4").write_bytes((clip_dir / "clip.mp4").read_bytes())
    record = {"messages": [{"role": "user", "content": "<image>Compare with <video>"},
                           {"role": "assistant", "content": "The clip is bluer."}],
              "images": ["red.png"], "videos": ["clip.mp4"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    model = next(v for v in VARIANTS if _collator(tiny_checkpoint, v)[1].family.takes_video)
    assert main(["data", "preview", str(tmp_path / "d.jsonl"), "--model", str(tiny_checkpoint(model))]) == 0
    out = capsys.readouterr().out
    assert "(4 image, 12 video, " in out and "<image × 4>" in out and "<video × 12>" in out, out
