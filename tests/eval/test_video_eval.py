"""`vlm eval` on video records (the layouts `vlm train` reads): captions generated from the frames
and compared with the bf16 baseline on the families that take video; a named error on the others.

Real tiny mp4 clips (PyAV, the writer of tests/data_formats/test_video.py) and the zoo's tiny
checkpoints, every family from the zoo's registry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.data_formats.test_video import write_clip
from vlm.cli.main import main
from vlm.data_formats import problems
from vlm.errors import DataError
from vlm.eval.data import read_eval_items
from vlm.zoo import VARIANTS

from ._helpers import write_eval_file

ASK = "What happens in the clip?"


def _video_records() -> list[dict]:
    """One clip per layout a user brings: LLaMA-Factory `videos`, Qwen2-VL-Finetune `video`, a
    typed `{"type": "video"}` part (TRL / OpenAI messages)."""
    return [
        {"messages": [{"role": "user", "content": f"<video>{ASK}"},
                      {"role": "assistant", "content": "a red screen fades in while a blue bar grows"}],
         "videos": ["grow.mp4"]},
        {"id": "finetune-clip", "video": "short.mp4",
         "conversations": [{"from": "human", "value": f"<video>\n{ASK}"},
                           {"from": "gpt", "value": "a short clip of a growing bar"}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "wide.mp4"},
                                                   {"type": "text", "text": ASK}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "a wide frame with a bar"}]}]},
    ]


def write_video_eval(folder: Path) -> Path:
    """Two image records (indices 0, 1), then the three video records (indices 2-4): mixed sizes
    and lengths, so batches mix images with videos of different frame and token counts."""
    folder.mkdir(parents=True, exist_ok=True)
    write_clip(folder / "grow.mp4")                       # 12 frames at 4 fps: 6 sampled at 2 fps
    write_clip(folder / "short.mp4", n=4, fps=4)           # 1 s: 2 sampled
    write_clip(folder / "wide.mp4", n=8, fps=4, w=96, h=48)
    return write_eval_file(folder, captions=["a red circle", "a blue square"], extra_records=_video_records())


def _takes_video(path) -> bool:
    from vlm.families import family_for_config
    from vlm.load import load_config

    return family_for_config(load_config(path)).takes_video


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_video_records_evaluate_or_are_refused_by_name(tiny_checkpoint, variant, tmp_path, capsys):
    model = tiny_checkpoint(variant)
    data = write_video_eval(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(model), "--data", str(data), "--compare", "bf16,fp32", "--out", str(out),
               "--max-new-tokens", "4", "--batch-size", "3", "--no-meteor", "--device", "cpu"])
    err = capsys.readouterr().err
    if not _takes_video(model):
        assert rc == 1 and not out.exists()
        assert f"{data}, record 2: the record holds a video (and 2 more video record(s))" in err, err
        from vlm.families.registry import video_family_names

        assert f"takes no video (families that do: {', '.join(video_family_names())})" in err
        return
    assert rc == 0, err
    assert "eval: 2 images, 3 videos, 5 reference captions" in err
    results = json.loads((out / "results.json").read_text())
    assert results["num_items"] == 5
    fp32 = next(v for v in results["variants"] if v["name"] == "fp32")
    assert fp32["teacher_forced"]["caption_tokens"] > 0
    assert math.isfinite(fp32["agreement"]["kl_mean"]) and 0 <= fp32["agreement"]["top1_agreement"] <= 1
    rows = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    by_item = {(r["variant"], r["item_id"]): r for r in rows}
    assert len(by_item) == 2 * 5
    assert by_item[("bf16", "finetune-clip")]["references"] == ["a short clip of a growing bar"]
    assert all(1 <= r["num_tokens"] <= 4 for r in rows)


@pytest.fixture(scope="module")
def video_families(tiny_checkpoint):
    return [v for v in VARIANTS if _takes_video(tiny_checkpoint(v))]


def test_frames_reach_the_model_and_batches_mix_images_with_videos(tiny_checkpoint, video_families, tmp_path):
    """Teacher-forced log-probs of the same reference differ between two different clips (the frames,
    not only the prompt, reach the language model), and a batch mixing images with videos of
    different sizes gives each item the log-probs it gets alone (media land on their own rows)."""
    from vlm.eval.agreement import teacher_forced_logprobs
    from vlm.eval.generation import GenerationSettings
    from vlm.eval.harness import load_variant

    assert video_families, "the zoo has no family that takes video"
    items = read_eval_items(write_video_eval(tmp_path))
    assert [it.media for it in items] == ["image", "image", "video", "video", "video"]
    assert [it.video[0].shape[0] for it in items[2:]] == [6, 2, 4]     # frames sampled at 2 fps
    same_ref = [items[2], items[3]]
    for it in same_ref:
        it.references = ["a bar grows"]
        it.prompt = ASK
    for variant in video_families:
        model, processor = load_variant(str(tiny_checkpoint(variant)), "fp32", None, "cpu")
        alone = [c for it in items for c in
                 next(teacher_forced_logprobs(model, processor, [it], GenerationSettings(batch_size=1)))]
        mixed = [c for b in teacher_forced_logprobs(model, processor, items, GenerationSettings(batch_size=5))
                 for c in b]
        for a, m in zip(alone, mixed):
            assert torch.equal(a.targets, m.targets)
            assert torch.allclose(a.logprobs, m.logprobs, atol=1e-4), variant
        a, b = (next(teacher_forced_logprobs(model, processor, [it], GenerationSettings(batch_size=1)))[0]
                for it in same_ref)
        assert torch.equal(a.targets, b.targets)
        assert (a.logprobs - b.logprobs).abs().max() > 1e-3, f"{variant}: the clip does not change the output"


def test_bad_video_records_are_named(tmp_path):
    """A video that does not decode, and a record with an image and a video (or two images: one
    reference cannot describe both), are errors naming the file and the record (before any model loads)."""
    folder = tmp_path / "d"
    data = write_video_eval(folder)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    broken = {"id": "bad", "video": "broken.mp4",
              "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "x"}]}
    both = {"image": "0.png", "videos": ["grow.mp4"],
            "messages": [{"role": "user", "content": "<image><video>Compare."},
                         {"role": "assistant", "content": "the same colours"}]}
    two_images = {"images": ["0.png", "1.png"], "messages": [{"role": "user", "content": "<image><image>Compare."},
                                                           {"role": "assistant", "content": "two squares"}]}
    lines = data.read_text().splitlines()
    for extra, code, index in ((broken, problems.CORRUPT_VIDEO, 5), (both, "several_media", 5),
                               (two_images, "several_media", 5)):
        data.write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
        with pytest.raises(DataError) as e:
            read_eval_items(data)
        assert (e.value.file, e.value.index, e.value.code) == (str(data), index, code), str(e.value)
    data.write_text("\n".join(lines + [json.dumps(broken)]) + "\n")
    assert main(["eval", "--endpoint", "http://127.0.0.1:9", "--served-model", "m", "--data", str(data),
                 "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_gguf_variants_refuse_video_before_exporting(tiny_checkpoint, video_families, tmp_path, capsys):
    """llama.cpp's runtime takes images only here: a `gguf:` variant on a file with video records stops
    before any export or model load, naming the first video record."""
    data = write_video_eval(tmp_path / "data")
    rc = main(["eval", "--model", str(tiny_checkpoint(video_families[0])), "--data", str(data),
               "--compare", "bf16,gguf:f16", "--out", str(tmp_path / "out"), "--no-meteor", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and not (tmp_path / "out").exists()
    assert f"{data}, record 2: the record holds a video" in err and "GGUF variant gguf:f16" in err, err
    assert "loading" not in err and "exporting" not in err


def test_video_item_without_user_text_gets_a_video_prompt(tmp_path):
    from vlm.eval.generation import GenerationSettings, prompt_for

    folder = tmp_path / "d"
    folder.mkdir()
    write_clip(folder / "clip.mp4")
    (folder / "e.jsonl").write_text(json.dumps({"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a bar grows"}]}) + "\n")
    (item,) = read_eval_items(folder / "e.jsonl")
    assert item.prompt is None and prompt_for(item, GenerationSettings()) == "Describe this video in one sentence."


def test_clipscore_scores_the_image_items_and_says_it_left_videos_out(tmp_path):
    """CLIPScore compares one image with a caption: on a mixed file it scores the image items (the
    same value as scoring them alone) and a notice counts the videos it left out."""
    from vlm.eval.clipscore import ClipScorer
    from vlm.eval.generation import GenerationResult
    from vlm.eval.harness import EvalConfig, _clipscore

    torch.manual_seed(0)
    scorer = ClipScorer("ViT-S-32", pretrained=None)   # the small open_clip ViT: random weights, saved
    weights = tmp_path / "clip.pt"
    torch.save(scorer.model.state_dict(), weights)
    items = read_eval_items(write_video_eval(tmp_path / "data"))
    captions = ["a red circle", "a blue square", "a bar grows", "a short clip", "a wide frame"]
    generations = {"bf16": GenerationResult(captions, [3] * 5, 1.0, None, None, "n/a")}
    results, notices = {"variants": [{"name": "bf16"}]}, []
    _clipscore(EvalConfig(data="x", model="m", clip_model="ViT-S-32", clip_weights=str(weights), device="cpu"), items, results,
               generations, notices)
    assert results["variants"][0]["clipscore"] == pytest.approx(scorer([it.image for it in items[:2]], captions[:2]))
    assert notices == ["CLIPScore covers the 2 image items only: it scores one image, so the 3 video items are left out"]
