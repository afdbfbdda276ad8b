"""Packed rows compute exactly what the same samples compute alone, for every zoo family.

For each family in the zoo registry: three realistic samples (different image sizes and aspect
ratios, a two-image multi-turn record, a text-only record; plus a real mp4 record for the families
that take video) are run (a) one by one, unpadded, with the
model's own positions, and (b) packed into one row with a padding tail. The summed token losses and
every parameter's gradient must agree (fp32). This fails if attention crosses a sample boundary, if
a sample's positions (M-RoPE's three axes for Qwen2-VL / Qwen2.5-VL) do not restart, or if the
boundary token is trained to predict the next sample. A family that cannot pack refuses by name.
"""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from vlm.data_formats.collator import IGNORE_INDEX, VisionChatCollator
from vlm.data_formats.conversation import Conversation, ImageRef, ImageSlot, Turn
from vlm.data_formats.packing import (PackingCollator, bucket_length, packing_refusal, plan_packs,
                                      plan_padded_batches)
from vlm.errors import ConfigError, VlmError
from vlm.zoo import VARIANTS

from ._tiny_run import write_config


def _image(w, h, color):
    img = Image.new("RGB", (w, h), color)
    img.paste((255, 255, 255), (w // 4, h // 4, w // 2, h // 2))
    return img


def _samples():
    one = Conversation([Turn("user", [ImageSlot(0), "Describe the image."]),
                        Turn("assistant", ["a wide red field with a white square near the top left corner"])],
                       [ImageRef("pil", _image(96, 48, (200, 30, 30)))], source="mem", index=0)
    two = Conversation([Turn("user", [ImageSlot(0), "What is this?"]), Turn("assistant", ["a blue card"]),
                        Turn("user", [ImageSlot(1), "And this one, compared?"]),
                        Turn("assistant", ["a taller green card, narrower than the first"])],
                       [ImageRef("pil", _image(64, 64, (30, 30, 200))),
                        ImageRef("pil", _image(40, 80, (30, 160, 60)))], source="mem", index=1)
    text = Conversation([Turn("user", ["Say hello twice."]), Turn("assistant", ["hello hello"])], [],
                        source="mem", index=2)
    return [one, two, text]


def _clip(path, frames=8, fps=4, w=64, h=48):
    """A short real mp4 (PyAV): frame i has red = 25·i."""
    import av
    import numpy as np

    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for i in range(frames):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:, :, 0] = 25 * i
        arr[:, : 6 * i + 1, 2] = 200
        for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def _video_sample(tmp_path):
    from vlm.data_formats.conversation import VideoSlot

    clip = _clip(tmp_path / "clip.mp4")
    return Conversation([Turn("user", [VideoSlot(0), "What happens?"]),
                         Turn("assistant", ["a blue bar grows to the right while the red rises"])],
                        [], videos=[ImageRef("path", clip.name)], image_root=str(tmp_path), source="mem", index=3)


def _load(tiny_checkpoint, variant):
    import vlm

    model, processor = vlm.load(str(tiny_checkpoint(variant)), dtype="fp32", device="cpu")
    model.eval()   # no dropout: both runs must see the same function
    # train_on="all": the first token of every sample carries a label, so a packed row that let the
    # previous sample predict it would count one loss term too many
    return model, VisionChatCollator(processor, model.vlm_family, pad_to_multiple_of=1, train_on="all")


def _token_loss_sum_and_grads(model, batches):
    """Σ over label tokens of CE (HF's mean × label count per batch) and the gradients of
    (that sum / all label tokens)."""
    model.zero_grad(set_to_none=True)
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    total = 0.0
    for batch, n in zip(batches, counts):
        loss = model(**batch).loss * n / sum(counts)
        loss.backward()
        total += float(loss.detach()) * sum(counts)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return total, grads


@pytest.mark.parametrize("attention", ["varlen", "mask"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_equals_unpacked(tiny_checkpoint, variant, attention, tmp_path):
    from vlm.train.packed_forward import collator_positions, enable
    from vlm.train.varlen_attention import refusal as varlen_refusal

    model, collator = _load(tiny_checkpoint, variant)
    family = model.vlm_family
    samples = _samples()
    if family.takes_video:   # a video record between the image records: its grid is consumed in order
        samples.insert(1, _video_sample(tmp_path))
    if packing_refusal(family) is not None:
        assert family.name in packing_refusal(family)
        with pytest.raises(ConfigError, match=f"packing: {family.name}"):
            enable(model, family)
        return
    alone = [collator([s]) for s in samples]
    assert all(b["attention_mask"].all() for b in alone)   # unpadded: each sample as it is alone
    ref_loss, ref_grads = _token_loss_sum_and_grads(model, alone)

    # the batch ships its boundaries and (M-RoPE) positions, computed on CPU as in `vlm train`
    packer = PackingCollator(collator, packed=True, max_tokens=1024, buckets=4, multiple=64,
                             mrope_positions=collator_positions(model, family))
    packed = packer([samples[:-1], samples[-1:]])   # two rows: segments restart at a row boundary too
    lengths = [b["input_ids"].shape[1] for b in alone]
    assert packed["input_ids"].shape == (2, bucket_length(sum(lengths[:-1]), 1024, 4, 64))
    assert packed["input_ids"].shape[1] > sum(lengths[:-1])   # a padding tail is part of the test
    assert int(packed["attention_mask"].sum()) == sum(lengths)
    handle = enable(model, family, varlen=attention == "varlen")
    # varlen wherever the family's language attention is purely causal; else the block mask, said why
    assert handle.varlen == (attention == "varlen" and varlen_refusal(family, model) is None)
    try:
        loss, grads = _token_loss_sum_and_grads(model, [packed])
    finally:
        handle.remove()
    assert model.config.get_text_config()._attn_implementation != "vlm_varlen"   # put back
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_plans_respect_the_budget_and_keep_every_sample():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 900) for _ in range(2500)]
    packs = plan_packs(lengths, 2048, seed=3)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 2048 for p in packs)
    assert packs == plan_packs(lengths, 2048, seed=3) != plan_packs(lengths, 2048, seed=4)
    # first-fit decreasing fills rows: the total is within a few % of the ideal row count
    assert len(packs) <= 1.03 * sum(lengths) / 2048 + 3
    groups = plan_padded_batches(lengths, 2048, seed=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(len(g) * max(lengths[i] for i in g) <= 2048 for g in groups)
    with pytest.raises(ConfigError, match="max_tokens_per_batch"):
        plan_packs([10, 3000], 2048)


def test_bucket_lengths_are_few():
    shapes = {bucket_length(n, 8192, 16) for n in range(1, 8193)}
    assert len(shapes) == 16 and max(shapes) == 8192
    assert all(bucket_length(n, 8192, 16) >= n for n in range(1, 8193, 7))


def _train(tmp_path, checkpoint, data_json, **extra):
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    cfg = write_config(tmp_path, checkpoint, data_json, max_steps=3, save_steps=100, batch_size=1,
                       extra={"data.max_tokens_per_batch": 256, "training.grad_accum": 2, **extra})
    return train(load_config(cfg), progress=False).summary


def test_vlm_train_packs_by_tokens_and_reports_startup(tmp_path, tiny_checkpoint, capsys):
    from vlm.data_formats.synthetic import generate

    data = generate(tmp_path / "data", n=40, seed=1)
    s = _train(tmp_path, tiny_checkpoint("qwen2_vl"), data.sharegpt_json, **{"logging.profile_steps": [2, 2]})
    budget = s["data"]["token_budget"]
    assert budget["packed"] and budget["samples_per_row"] > 3 and budget["padding_fraction"] < 0.05
    assert s["steps"] == 3 and len(s["step_times"]) == 3
    assert s["padding_fraction"] == pytest.approx(1 - s["tokens"] / s["computed_tokens"], abs=1e-4)
    assert s["padding_fraction"] < 0.05
    assert s["computed_tokens"] % 16 == 0   # rows padded to a length bucket (256 / 16 buckets apart)
    startup = s["startup_seconds"]
    assert startup["load_s"] > 0 and startup["first_step_s"] > 0
    assert startup["to_first_step_s"] > startup["load_s"] + startup["first_step_s"]
    out = capsys.readouterr().out
    assert "startup: imports" in out and "packed" in out
    assert "attention: per sample over packed boundaries (varlen)" in out
    profile = (tmp_path / "out" / "profile.txt").read_text()   # logging.profile_steps: the step's operators
    assert "optimizer steps 2–2" in profile.splitlines()[0] and "aten::" in profile and "Self CPU time total" in profile
    # host reads with the stack that made them (transformers' own remain); none of them is ours or the
    # Trainer loop's: token counts are read once per step at the step clock, the NaN filter is off
    reads = profile[profile.index("host reads of device values by Python stack"):]
    assert "aten::_local_scalar_dense" in reads and "transformers/" in reads
    assert "vlm/train/trainer.py" not in reads
    lines = reads.splitlines()[2:]
    first_frames = [lines[i + 1].strip() for i, line in enumerate(lines[:-1]) if re.match(r"^\s*\d+\s+\S", line)]
    assert first_frames and not any(f.startswith("transformers/trainer.py") for f in first_frames), reads
    assert (tmp_path / "out" / "profile_trace.json").stat().st_size > 0


def test_vlm_train_mllama_falls_back_to_padded_rows_with_the_reason(tmp_path, tiny_checkpoint, capsys):
    from vlm.data_formats.synthetic import generate

    data = generate(tmp_path / "data", n=16, seed=1)
    s = _train(tmp_path, tiny_checkpoint("mllama"), data.sharegpt_json)
    budget = s["data"]["token_budget"]
    assert not budget["packed"] and "mllama" in budget["packing_refused"]
    assert s["steps"] == 3
    assert "packing off (mllama: images enter through cross-attention" in capsys.readouterr().out
    (tmp_path / "again").mkdir()
    with pytest.raises(VlmError, match="data.packing: true, but mllama"):
        _train(tmp_path / "again", tiny_checkpoint("mllama"), data.sharegpt_json, **{"data.packing": True})
