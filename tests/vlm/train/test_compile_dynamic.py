"""Compiled decoder layers compile in the first batch and never again as row lengths change.

Why: with torch's default the first shape compiles static and the next distinct length recompiles
dynamic. Under DDP/FSDP each process sees different rows, so each recompiled at a different step
and the other waited for it at the next collective (2 x H200, compiled DDP at 0.95x one GPU,
benchmarks/NOTES.md). ``vlm.train.compile`` marks the varying sizes dynamic before the first compile.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vlm
from vlm.lora import apply_lora
from vlm.train import compile as vlm_compile
from vlm.train.compile import compile_language_layers


def _chat(processor, turns):
    """One sample (a packed-row-like batch of 1): ``turns`` of (image size or None, question, answer)."""
    from PIL import Image, ImageDraw

    messages, images = [], []
    for i, (size, question, answer) in enumerate(turns):
        content = [{"type": "text", "text": question}]
        if size is not None:
            img = Image.new("RGB", size, (30 + 40 * i, 60, 200 - 30 * i))
            ImageDraw.Draw(img).rectangle([2, 2, size[0] // 2, size[1] // 3], fill=(220, 30, 30))
            content.insert(0, {"type": "image", "image": img})
            images.append(img)
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return batch


def _batches(processor):
    """Rows of different lengths and image counts and sizes, as packed training hands each process."""
    return [
        _chat(processor, [((56, 56), "What is this?", "a red box.")]),
        _chat(processor, [((112, 84), "Describe the picture in detail.", "a red box in the upper left " * 6),
                          ((40, 56), "And this one?", "green.")]),
        _chat(processor, [(None, "Say hello.", "hello there, how can I help you today?"),
                          ((84, 140), "Colour?", "mostly blue with a red corner " * 3)]),
        _chat(processor, [((56, 112), "One?", "yes"), ((56, 56), "Two?", "no"), ((140, 56), "Three?", "maybe " * 9)]),
    ]


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _graphs_per_batch(model, batches) -> list[int]:
    """Graphs dynamo compiled in each batch's forward + backward (one optimizer-free training step)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_language_layers(model, model.vlm_family, backend="aot_eager")
    model.train()
    out = []
    for batch in batches:
        before = _graphs()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        out.append(_graphs() - before)
    return out


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return vlm.load(tiny_checkpoint("qwen2_vl"), dtype="fp32", device="cpu")


def test_compiled_layers_do_not_recompile_after_the_first_batch(qwen, monkeypatch):
    model, processor = qwen
    batches = _batches(processor)
    lengths = {b["input_ids"].shape[1] for b in batches}
    assert len(lengths) == len(batches), "every row a different length"
    base = apply_lora(copy.deepcopy(model), model.vlm_family, r=4, alpha=8, gradient_checkpointing=True, warn=False)

    marked = _graphs_per_batch(copy.deepcopy(base), batches)
    assert marked[0] > 0 and marked[1:] == [0] * (len(batches) - 1), f"graphs compiled per batch: {marked}"

    # the same layers without the marks (torch's default): the second length recompiles
    monkeypatch.setattr(vlm_compile, "_mark_token_dims", lambda args, kwargs: None)
    default = _graphs_per_batch(copy.deepcopy(base), batches)
    assert sum(default[1:]) > 0, f"torch's default recompiled nothing: {default}"


def test_marks_reach_token_dims_and_boundaries_only():
    """The marks: the hidden states' token dimension, that size wherever else it appears (position
    tables, masks), the length of 1-D integer boundaries — never the hidden size or a 1-element
    max-length tensor."""
    hidden = torch.zeros(1, 37, 16)
    cos = torch.zeros(3, 1, 37, 8)
    cu = torch.tensor([0, 10, 37], dtype=torch.int32)
    longest = torch.tensor([27], dtype=torch.int32)
    vlm_compile._mark_token_dims((hidden,), {"position_embeddings": (cos, cos.clone()), "cu_seq_lens_q": cu,
                                             "vlm_max_seqlen": longest})

    def marked(t):
        return set(getattr(t, "_dynamo_weak_dynamic_indices", set()) | getattr(t, "_dynamo_dynamic_indices", set()))

    assert marked(hidden) == {1}
    assert marked(cos) == {2}
    assert marked(cu) == {0}
    assert marked(longest) == set()
