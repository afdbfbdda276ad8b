"""The packing collator ships the samples' boundaries and M-RoPE positions; the training step reads
nothing back from the device and runs no rope index.

For every family of the zoo registry that packs, on realistic packed rows (images of different sizes
and aspect ratios, a two-image multi-turn record, text-only records between image records, a real
mp4 for the families that take video, a padding tail, two rows):

- the (4, B, L) M-RoPE positions the collator computed on CPU are EQUAL (``torch.equal``) to what the
  model's own ``get_rope_index`` gives each sample alone, and to what the hook computes on the model;
- the hook, given the shipped values, does no host read: run on the meta device (tensors without
  data: any device→host read raises), it passes; the same batch without them raises — what the
  step did before, one read per micro-batch;
- a training step with the shipped values has the loss and gradients of the step without them, the
  model's ``get_rope_index`` is not called, and the shipped keys never reach the language model;
- ``vlm train`` trains on packed rows with ``data.num_workers`` 0 and 2, to the same losses.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from vlm.data_formats.packing import CU_SEQLENS, MAX_SEQLEN, MROPE_POSITIONS, SEGMENT_KEYS, PackingCollator
from vlm.data_formats.segments import row_spans, segment_boundaries
from vlm.families.registry import all_families
from vlm.zoo import VARIANTS

from ._tiny_run import write_config
from .test_packing import _image, _samples, _token_loss_sum_and_grads, _video_sample


def _family(variant):
    return next(f for f in all_families().values() if variant in f.zoo_variants)


def _mrope(family) -> bool:
    return family.language_kernels.rope.startswith("mrope")


PACKING = [v for v in VARIANTS if not _family(v).cross_attention_images]
MROPE = [v for v in PACKING if _mrope(_family(v))]


def _load(tiny_checkpoint, variant):
    import vlm
    from vlm.data_formats.collator import VisionChatCollator

    model, processor = vlm.load(str(tiny_checkpoint(variant)), dtype="fp32", device="cpu")
    model.eval()   # no dropout: both paths must see the same function
    # 3 frames a second: Qwen2.5-VL's second_per_grid_ts is 2/3, not an integer (transformers
    # releases differ in how they round it: the CPU path must round as the installed one does)
    return model, VisionChatCollator(processor, model.vlm_family, pad_to_multiple_of=1, train_on="all",
                                     video_fps=3.0)


def _rows(family, tmp_path):
    """Two packed rows: [wide image, text-only, (video), two images] and [tall image, two images,
    text-only] — the grids of both rows consumed in token order; a padding tail on both."""
    one, two, text = _samples()
    from vlm.data_formats.conversation import Conversation, ImageRef, ImageSlot, Turn

    tall = Conversation([Turn("user", ["Which colour?", ImageSlot(0)]),
                         Turn("assistant", ["mostly yellow, " * 6 + "with a white square"])],
                        [ImageRef("pil", _image(36, 120, (220, 200, 20)))], source="mem", index=4)
    first = [one, text] + ([_video_sample(tmp_path)] if family.takes_video else []) + [two]
    return [first, [tall, two, text]]


def _packer(model, collator):
    """The packing collator as `vlm train` builds it: it ships the boundaries, and the M-RoPE
    positions by the model's rule."""
    from vlm.train.packed_forward import collator_positions

    return PackingCollator(collator, packed=True, max_tokens=1024, buckets=4, multiple=64,
                           mrope_positions=collator_positions(model, model.vlm_family))


def _without_shipped(batch):
    return {k: v for k, v in batch.items() if k not in SEGMENT_KEYS}


@pytest.mark.parametrize("variant", MROPE)
def test_collator_mrope_positions_equal_the_models_get_rope_index(tiny_checkpoint, variant, tmp_path):
    from vlm.train.mrope_positions import packed_mrope_positions
    from vlm.train.packed_forward import multimodal_model

    model, collator = _load(tiny_checkpoint, variant)
    family = model.vlm_family
    mm_model = multimodal_model(model, family)
    groups = _rows(family, tmp_path)
    packer = _packer(model, collator)
    batch = packer(groups)
    shipped = batch[MROPE_POSITIONS]
    # as DataLoader workers get it under any start method: pickled, without the model
    in_worker = pickle.loads(pickle.dumps(packer))
    assert torch.equal(in_worker(groups)[MROPE_POSITIONS], shipped)
    rows, length = batch["input_ids"].shape
    assert shipped.shape == (4, rows, length) and shipped.dtype == torch.long and shipped.device.type == "cpu"
    if family.takes_video:
        assert "video_grid_thw" in batch
    spans = row_spans(segment_boundaries(batch["position_ids"]), length)
    assert len(spans) == sum(len(g) for g in groups) + rows   # every sample, and a tail on each row
    # each sample: the model's own get_rope_index on the sample alone, unpacked
    samples = iter(spans)
    for group in groups:
        for conv in group:
            row, start, end = next(samples)
            alone = collator([conv])
            expected, _ = mm_model.get_rope_index(
                input_ids=alone["input_ids"], mm_token_type_ids=alone["mm_token_type_ids"],
                image_grid_thw=alone.get("image_grid_thw"), video_grid_thw=alone.get("video_grid_thw"),
                attention_mask=alone["attention_mask"],
                **({"second_per_grid_ts": alone["second_per_grid_ts"]} if "second_per_grid_ts" in alone else {}))
            assert end - start == alone["input_ids"].shape[1]
            assert torch.equal(shipped[1:, row, start:end], expected[:, 0]), (conv.index, shipped[1:, row, start:end])
            assert torch.equal(shipped[0, row, start:end], torch.arange(end - start))
        next(samples)   # the row's padding tail
    # the whole tensor, tails included: what the hook computes on the model for a batch without it
    on_model = packed_mrope_positions(mm_model.get_rope_index, _without_shipped(batch),
                                      segment_boundaries(batch["position_ids"]))
    assert torch.equal(shipped, on_model)
    if "second_per_grid_ts" in batch:   # Qwen2.5-VL: the case where rounding rules differ is tested
        assert not float(batch["second_per_grid_ts"][0]).is_integer()


def _to_meta(batch):
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("variant", PACKING)
def test_hook_reads_nothing_back_when_the_batch_ships_segments(tiny_checkpoint, variant, tmp_path):
    from vlm.train import varlen_attention
    from vlm.train.packed_forward import enable, multimodal_model

    model, collator = _load(tiny_checkpoint, variant)
    family = model.vlm_family
    batch = _packer(model, collator)(_rows(family, tmp_path))
    assert batch[CU_SEQLENS].dtype == torch.int32 and isinstance(batch[MAX_SEQLEN], int)
    handle = enable(model, family)
    mm_model = multimodal_model(model, family)
    try:
        # meta tensors hold no data: .cpu(), .tolist(), .item() on them raise — a host read cannot hide
        _, kwargs = handle.prepare(mm_model, (), _to_meta(batch))
        assert not set(SEGMENT_KEYS) & set(kwargs)
        if handle.varlen:
            assert kwargs["cu_seq_lens_q"].device.type == "meta"
            assert int(kwargs["vlm_max_seqlen"]) == batch[MAX_SEQLEN]
        if _mrope(family):
            assert kwargs["position_ids"].shape == (4, *batch["input_ids"].shape)
        needs_boundaries = handle.varlen or _mrope(family)
        if needs_boundaries:   # the proxy catches the read the step did before
            with pytest.raises(NotImplementedError, match="meta"):
                handle.prepare(mm_model, (), _to_meta(_without_shipped(batch)))
    finally:
        varlen_attention.set_packed(False)
        handle.remove()


class _CountCalls:
    """Calls through to a bound method, counting them."""

    def __init__(self, method):
        self.method, self.calls = method, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.method(*args, **kwargs)


@pytest.mark.parametrize("variant", PACKING)
def test_shipped_segments_train_exactly_as_computed_ones(tiny_checkpoint, variant, tmp_path):
    from vlm.train.packed_forward import enable, multimodal_model

    model, collator = _load(tiny_checkpoint, variant)
    family = model.vlm_family
    batch = _packer(model, collator)(_rows(family, tmp_path))
    mm_model = multimodal_model(model, family)
    language = family.component_roots(model, "language")[0][1]
    seen_keys = []
    spy = language.register_forward_pre_hook(lambda m, a, kw: seen_keys.append(set(kw)), with_kwargs=True)
    mrope = _mrope(family)
    if mrope:   # an instance attribute, in front of the class's method
        rope_index = mm_model.get_rope_index = _CountCalls(mm_model.get_rope_index)
    handle = enable(model, family)
    try:
        loss, grads = _token_loss_sum_and_grads(model, [dict(batch)])
        calls_shipped = rope_index.calls if mrope else 0
        ref_loss, ref_grads = _token_loss_sum_and_grads(model, [_without_shipped(batch)])
    finally:
        handle.remove()
        spy.remove()
        if mrope:
            del mm_model.get_rope_index
    assert calls_shipped == 0
    if mrope:   # the path before: the model's rope index in the step
        assert rope_index.calls >= 1
    assert seen_keys and not any(set(SEGMENT_KEYS) & keys for keys in seen_keys)
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        assert torch.equal(grads[k], ref_grads[k]), k


def _train(tmp_path, checkpoint, data_json, workers):
    from vlm.train.config import load_config
    from vlm.train.recipe import train

    root = tmp_path / f"workers{workers}"
    root.mkdir()
    cfg = write_config(root, checkpoint, data_json, max_steps=3, save_steps=100, batch_size=1,
                       extra={"data.max_tokens_per_batch": 256, "training.grad_accum": 2,
                              "data.num_workers": workers})
    return train(load_config(cfg), progress=False).summary


def test_vlm_train_on_packed_rows_with_and_without_workers(tmp_path, tiny_checkpoint, monkeypatch):
    """``vlm train`` on packed M-RoPE rows: the same losses whether the collator (and the CPU rope
    index) runs in the main process or in 2 workers; the shipped values survive the Trainer's
    batch handling: the model's own get_rope_index never runs on the model (the collator's
    weightless instance runs it) and the hook never reads the positions back."""
    import vlm
    from vlm.data_formats.synthetic import generate
    from vlm.train.packed_forward import multimodal_model

    variant = MROPE[0]
    model, _ = vlm.load(str(tiny_checkpoint(variant)), dtype="fp32", device="cpu")
    mm_class = type(multimodal_model(model, model.vlm_family))
    del model
    calls_on_weights = []
    original = mm_class.get_rope_index

    def counting(self, *args, **kwargs):
        if any(True for _ in self.parameters()):   # a real model, not the collator's weightless instance
            calls_on_weights.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(mm_class, "get_rope_index", counting)
    from vlm.train import packed_forward

    host_reads = _CountCalls(packed_forward.segment_boundaries)   # the hook's fallback (not the collator's)
    monkeypatch.setattr(packed_forward, "segment_boundaries", host_reads)
    data = generate(tmp_path / "data", n=40, seed=1)
    losses = {}
    for workers in (0, 2):
        s = _train(tmp_path, tiny_checkpoint(variant), data.sharegpt_json, workers)
        assert s["steps"] == 3 and s["data"]["token_budget"]["packed"]
        losses[workers] = s["loss_history"]
    assert calls_on_weights == [] and host_reads.calls == 0
    assert losses[0] and losses[0] == losses[2]
