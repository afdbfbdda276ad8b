"""A training micro-batch makes no host read of a device value, for every family of the zoo registry.

A host read (``.item()``, ``.tolist()``, ``.cpu()``, printing a tensor), an op whose output size
depends on device data (``nonzero``, boolean indexing, ``repeat_interleave`` without an output size)
and a blocking host→device copy each make the host wait until the GPU has run everything queued:
the step turns host-bound. :class:`vlm.train.host_read_probe.HostReadProbe` runs the step on CPU
with every parameter, buffer and batch tensor on an emulated device and records each such place
with its stack (and raises where a GPU would refuse a host tensor in a device op).

Per family, on realistic packed rows (images of different sizes and aspect ratios, a two-image
multi-turn record, text-only records between them, a real mp4 for the families that take video, a
padding tail, two rows), LoRA with activation checkpointing as ``vlm train`` sets it up, the
batched vision attention of ``vlm.train.fast_path``, and the packing hook: forward + backward
records exactly the reads of :data:`ALLOWED` (each with why it stays), and the loss and gradients
equal (fp32 tolerance) those of the same step on plain CPU tensors and those of the samples run one
by one through transformers' own code. Mllama cannot pack: its padded batch is checked.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from vlm.data_formats.collator import IGNORE_INDEX
from vlm.data_formats.packing import HOST_INPUTS
from vlm.zoo import VARIANTS

from .test_packed_batch_segments import _family, _load, _packer, _rows

# variant -> {(kind, op, "file function" of the first frame outside torch): count per micro-batch}
# Every entry is transformers' own code on a path with no input that avoids it:
ALLOWED: dict[str, dict[tuple[str, str, str], int]] = {
    # images attend both ways inside an image, so packed rows keep transformers' block mask, built
    # from the position resets by find_packed_sequence_indices, which asks whether any row packs
    # (one bool read per mask: full, sliding window, and the backward's recompute of the layer)
    "gemma3": {("scalar read", "_local_scalar_dense",
                "transformers/masking_utils.py find_packed_sequence_indices"): 3},
    # LlavaModel/Mistral3Model.get_image_features split the projected features per image with
    # torch.as_tensor(image_sizes, device=features.device).tolist(): a copy to the device and a read
    # back, whatever form image_sizes takes (their Pixtral tower reads none: it gets host sizes)
    "pixtral": {("blocking host→device copy", "torch.as_tensor of a host tensor",
                 "transformers/models/llava/modeling_llava.py get_image_features"): 1,
                ("device→host copy", "tolist", "transformers/models/llava/modeling_llava.py get_image_features"): 1},
    "mistral3": {("blocking host→device copy", "torch.as_tensor of a host tensor",
                  "transformers/models/mistral3/modeling_mistral3.py get_image_features"): 1,
                 ("device→host copy", "tolist",
                  "transformers/models/mistral3/modeling_mistral3.py get_image_features"): 1},
    # Qwen3-VL, a batch with images AND videos: the model's forward lays the DeepStack features of
    # both out by boolean indexing (image_mask[visual_pos_masks], new_zeros(visual_pos_masks.sum()),
    # embed_joint[mask] = ...), per DeepStack layer (2 here). A batch of one modality takes the
    # branch without them; the DeepStack sum itself reads nothing (deepstack_without_read)
    "qwen3_vl": {("size from data", "index with a boolean mask",
                  "transformers/models/qwen3_vl/modeling_qwen3_vl.py forward"): 2,
                 ("scalar read", "_local_scalar_dense", "transformers/models/qwen3_vl/modeling_qwen3_vl.py forward"): 2,
                 ("size from data", "index_put_ with a boolean mask",
                  "transformers/models/qwen3_vl/modeling_qwen3_vl.py forward"): 4},
    # Mllama cannot pack (cross-attention): padded rows take transformers' SDPA mask, whose builder
    # reads whether the padding mask is all ones to skip the mask (_ignore_causal_mask_sdpa)
    "mllama": {("scalar read", "_local_scalar_dense",
                "transformers/masking_utils.py _ignore_causal_mask_sdpa"): 2},
}


def _place(read) -> tuple[str, str, str]:
    """(kind, op, where): the first frame outside torch without its line number (lines move between
    transformers releases); a read made by the autograd engine itself is 'backward'."""
    frame = next((f for f in read.stack if not f.startswith(("tests/", "vlm/train/host_read_probe"))), None)
    if frame is None or read.stack[0].startswith("tests/"):
        return read.kind, read.op, "backward"
    path, name = frame.split(" ", 1)
    return read.kind, read.op, f"{path.rsplit(':', 1)[0]} {name}"


def _training_model(tiny_checkpoint, variant):
    """The tiny model and collator as ``vlm train`` prepares them (LoRA on the language side with
    activation checkpointing, the batched vision attention); fp32, no dropout."""
    from vlm.lora import apply_lora
    from vlm.vision_attention import batch_equal_images

    model, collator = _load(tiny_checkpoint, variant)
    family = model.vlm_family
    model = apply_lora(model, family, r=8, alpha=16, dropout=0.0, targets=["language.attention", "language.mlp"],
                       gradient_checkpointing=True)
    batch_equal_images(model, family)
    model.train()
    return model, collator, family


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _probed_step(model, batch):
    """One forward + backward with the model and batch on the emulated device: (probe, loss, grads)."""
    from vlm.train.host_read_probe import HostReadProbe

    with HostReadProbe() as probe:   # the model's own tensors are put back on exit
        probe.place(model)
        loss, grads = _step(model, probe.to_device(batch))
        loss, grads = HostReadProbe.to_host((loss, grads))
    return probe, loss, grads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_micro_batch_makes_no_host_read(tiny_checkpoint, variant, tmp_path):
    from vlm.train import varlen_attention
    from vlm.train.packed_forward import enable

    torch.manual_seed(0)
    model, collator, family = _training_model(tiny_checkpoint, variant)
    groups = _rows(family, tmp_path)
    packs = not _family(variant).cross_attention_images
    if packs:
        batch = _packer(model, collator)(groups)
        handle = enable(model, family)
    else:   # padded rows; Mllama's processor wants an image in every sample of a batch
        batch, handle = collator([c for g in groups for c in g if c.images]), None
    try:
        probe, loss, grads = _probed_step(model, batch)
        plain_loss, plain_grads = _step(model, batch)
    finally:
        if handle is not None:
            handle.remove()
        varlen_attention.set_packed(False)
    found = Counter()
    for read, n in probe.reads.items():
        found[_place(read)] += n
    assert dict(found) == ALLOWED.get(variant, {}), f"{dict(found)}\n{probe.report()}"

    # the probe runs the same step (to rounding: on the emulated device torch picks its math SDPA)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=0)
    assert grads.keys() == plain_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], plain_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    if not packs:
        return
    # and transformers' own code on each sample alone (no hook, no host copies) computes the same
    samples = [collator([c]) for g in groups for c in g]
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in samples]
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b, n in zip(samples, counts):
        part = model(**b).loss * n / sum(counts)
        part.backward()
        total += float(part.detach())
    assert float(loss) == pytest.approx(total, rel=1e-5)
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_packed_batches_ship_host_copies(tiny_checkpoint, tmp_path):
    """What the model reads element by element travels as plain lists: no device placement moves
    them, and they equal the tensors they copy."""
    model, collator = _load(tiny_checkpoint, "qwen2_vl")
    batch = _packer(model, collator)(_rows(model.vlm_family, tmp_path))
    host = batch[HOST_INPUTS]
    assert host["image_grid_thw"] == batch["image_grid_thw"].tolist()
    assert host["packed_cu_seqlens"] == batch["packed_cu_seqlens"].tolist()
    assert host["video_grid_thw"] == batch["video_grid_thw"].tolist()
    assert all(isinstance(v, list) for v in host.values())


def test_vlm_train_queues_batch_copies_on_a_gpu():
    """On a GPU, ``vlm train`` moves batches with non-blocking copies from pinned memory
    (accelerate's default, a blocking copy per tensor, makes the host wait for the GPU at each)."""
    from transformers import TrainingArguments

    from vlm.train.recipe import batch_transfer_arguments

    args = batch_transfer_arguments("cuda:0")
    assert args["accelerator_config"]["non_blocking"] and args["dataloader_pin_memory"]
    assert batch_transfer_arguments("cpu") == {}
    # transformers takes them as given (use_cpu only because this machine has no GPU)
    built = TrainingArguments(output_dir="unused", use_cpu=True, **args)
    assert built.accelerator_config.non_blocking


def test_qwen3_vl_deepstack_reads_nothing_without_videos(tiny_checkpoint, tmp_path):
    """Qwen3-VL on image-only packed rows (the common case): no read at all — the DeepStack sum
    (index_add at nonzero_static positions) included; loss and gradients as transformers' own
    boolean-index sum computes them."""
    from vlm.train import varlen_attention
    from vlm.train.packed_forward import enable

    torch.manual_seed(0)
    model, collator, family = _training_model(tiny_checkpoint, "qwen3_vl")
    groups = [[c for c in g if not c.videos] for g in _rows(family, tmp_path)]
    batch = _packer(model, collator)(groups)
    handle = enable(model, family)
    try:
        probe, loss, grads = _probed_step(model, batch)
        language = family.component_roots(model, "language")[0][1]
        assert "_deepstack_process" in language.__dict__
    finally:
        handle.remove()
        varlen_attention.set_packed(False)
    assert "_deepstack_process" not in language.__dict__   # transformers' own method again
    assert probe.count == 0, probe.report()
    # the same hook without the DeepStack swap: transformers' boolean-index sum, same numbers
    reference = enable(model, family)
    reference._restores[-1]()
    try:
        ref_loss, ref_grads = _step(model, batch)
    finally:
        reference.remove()
        varlen_attention.set_packed(False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
