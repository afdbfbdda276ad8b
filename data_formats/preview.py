"""Show one sample as the model sees it: rendered text, image blocks collapsed, trained tokens marked.

Trained tokens are wrapped in ``⟦ ⟧``; an image block reads ``<image × 256>`` (its token count,
Pixtral's row breaks included).
"""

from __future__ import annotations

from typing import Any

from vlm.data_formats.collator import IGNORE_INDEX
from vlm.data_formats.image_tokens import expand_flags
from vlm.data_formats.records import parse_record
from vlm.data_formats.sources import default_image_root, iter_raw_records
from vlm.data_formats.validate import ImageValidator
from vlm.errors import DataError, VlmError


def find_conversation(source: Any, index: int, image_root: str | None = None):
    """Record ``index`` of ``source``, parsed and validated; records before it are only skipped
    over (a bad one there is not this record's problem)."""
    root = str(image_root) if image_root is not None else default_image_root(source)
    for item in iter_raw_records(source):
        at = item.index
        if isinstance(item, DataError) and (at is None or at == index):
            raise item
        if at is None or at < index:
            continue
        if at > index:
            break
        conv = parse_record(item.data, source=item.source, index=item.index, image_root=root)
        ImageValidator()(conv)
        return conv
    raise VlmError(f"{source}: no record {index}")


def render_preview(collator, conv) -> str:
    plan = collator.plan(conv)
    batch = collator([conv])
    ids = batch["input_ids"][0][: plan.keep].tolist()
    labels = batch["labels"][0][: plan.keep].tolist()
    # which expanded tokens are image tokens (recomputed from the untruncated expansion)
    full_ids = ids if plan.keep == plan.length else None
    wrap = collator.family.image_wrap
    if wrap is not None:   # plan.ids are expanded already: the image tokens are the wrap's token
        image_id = collator.tokenizer.convert_tokens_to_ids(wrap.token)
        is_image = [t == image_id for t in ids]
    else:
        _, is_image = expand_flags(plan.ids, plan.flags, collator.placeholder_ids, plan.image_counts,
                                   full_ids, "preview") if full_ids is not None else (None, None)
    tok = collator.tokenizer
    out: list[str] = []
    segment: list[int] = []      # consecutive text tokens in one state, decoded together
    state = None                 # "train" / "prompt" / "image"

    def flush():
        if state == "image":
            kind = "video" if segment and segment[0] == collator.video_token_id else "image"
            out.append(f"<{kind} × {len(segment)}>")
        elif state == "train":
            out.append("⟦" + tok.decode(segment) + "⟧")
        elif segment:
            out.append(tok.decode(segment))
        segment.clear()

    for k, (t, lab) in enumerate(zip(ids, labels)):
        image = is_image[k] if is_image is not None else t in collator.placeholder_ids
        now = "image" if image else ("train" if lab != IGNORE_INDEX else "prompt")
        if now != state:
            flush()
            state = now
        segment.append(t)
    flush()
    # plan.image_tokens counts image and video tokens; a video's all sit before any truncation point
    n_video = sum(t == collator.video_token_id for t in ids) if collator.video_token_id is not None else 0
    media = f"{plan.image_tokens - n_video} image, {n_video} video" if n_video else f"{plan.image_tokens} image"
    head = (f"record {conv.index}" + (f" (id={conv.record_id})" if conv.record_id else "")
            + f" of {conv.source}: {plan.keep} tokens ({media}, "
            f"{plan.keep - plan.image_tokens if plan.keep == plan.length else plan.keep} other), "
            f"{plan.trainable_tokens} trained" + (" [truncated]" if plan.truncated else ""))
    return head + "\n" + "".join(out) + "\n(⟦...⟧ = tokens with labels; everything else is -100)"


def preview_sample(source: Any, collator, index: int = 0, image_root: str | None = None) -> str:
    return render_preview(collator, find_conversation(source, index, image_root))
