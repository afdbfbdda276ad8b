"""Eval items: one image or one video, the prompt asked about it, and its reference captions.

Eval files are ordinary ShareGPT (``conversations``) or OpenAI ``messages`` records, read with
``vlm.data_formats`` (JSON / JSONL / parquet / a ``datasets`` folder), in every layout ``vlm train``
reads (LLaMA-Factory, LLaVA, Qwen2-VL-Finetune, ShareGPT4V, TRL). Each record gives one image or one
video (LLaMA-Factory's ``videos``, Qwen2-VL-Finetune's ``video``, a ``{"type": "video"}`` part), a
user prompt and the assistant's answer, which is the *reference caption*. Records naming the same
image or video are grouped into one item with several references (COCO-style data: five records
per image), in order of first appearance.

Videos are decoded once here, frames sampled by ``fps`` / ``max_frames`` exactly as the training
collator samples them (:mod:`vlm.data_formats.video`). Whether the model takes video is the
harness's question (it knows the family); this module only reads.

Errors are :class:`vlm.errors.DataError` naming the file and record: a record without an image or
video, a record with more than one (captioning compares one answer per picture or clip), a video
that does not decode, a record without a reference caption, or a file with no records at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.errors import DataError


@dataclass
class EvalItem:
    """One image or one video to caption: ``image`` is a decoded RGB PIL image (None for a video
    item); ``video`` is ``(frames, metadata)`` from :func:`vlm.data_formats.video.read_video`
    (uint8 ``(n, H, W, 3)`` frames and the processor's ``VideoMetadata`` fields), None for an image."""

    item_id: str
    image: Any
    references: list[str]
    prompt: str | None = None           # the record's own user text (None: no text in the user turn)
    sources: list[str] = field(default_factory=list)   # "file:record" of every record merged here
    video: Any = None
    where: dict = field(default_factory=dict)   # file / index / record_id of the first record (errors)

    @property
    def media(self) -> str:
        return "image" if self.video is None else "video"


def _media_key(kind: str, ref) -> tuple[str, str, str]:
    if ref.kind in ("path", "data_url"):
        return kind, ref.kind, str(ref.value)
    return kind, ref.kind, str(id(ref.value))


def _user_prompt(conv) -> str | None:
    for turn in conv.turns:
        if turn.role == "user":
            text = turn.text.strip()
            return text or None
    return None


def _one_medium(conv, where: dict) -> tuple[str, Any]:
    """``("image", ref)`` or ``("video", ref)``: the record's single image or video."""
    n_img, n_vid = len(conv.images), len(conv.videos)
    if n_img + n_vid == 0:
        raise DataError("the record has no image or video: caption evaluation needs one per record "
                        "(add an 'image' field and an <image> placeholder, or a 'video' / 'videos' field "
                        "and a <video> placeholder)", code="no_image", **where)
    if n_img + n_vid > 1:
        raise DataError(f"the record has {n_img} image(s) and {n_vid} video(s): caption evaluation takes "
                        "one image or one video per record (its reference describes that one); split the "
                        "record or evaluate it elsewhere", code="several_media", **where)
    return ("image", conv.images[0]) if n_img else ("video", conv.videos[0])


def read_eval_items(path: str | Path, *, image_root: str | None = None, limit: int | None = None,
                    video_sampling=None) -> list[EvalItem]:
    """Read ``path`` into :class:`EvalItem` s (grouped by image or video), decoding each once.

    ``video_sampling``: a :class:`vlm.data_formats.video.VideoSampling` (default 2 fps, at most 32
    frames, as in training). Raises DataError when the file holds no records, a record has no image
    or video or several, a video does not decode, or a reference (the last assistant turn) is empty.
    """
    from vlm.data_formats.images import open_image
    from vlm.data_formats.reader import iter_conversations
    from vlm.data_formats.video import VideoSampling, read_video

    sampling = video_sampling or VideoSampling()
    path = Path(path)
    if not path.exists():
        raise DataError(f"eval data {path} does not exist (give a ShareGPT or messages JSON/JSONL file)",
                        file=str(path), code="missing_file")
    items: dict[tuple[str, str, str], EvalItem] = {}
    n_records = 0
    for conv in iter_conversations(str(path), image_root=image_root, validate_images=False):
        n_records += 1
        where = dict(file=conv.source or str(path), index=conv.index, record_id=conv.record_id)
        kind, ref = _one_medium(conv, where)
        reference = conv.turns[conv.assistant_turn_indices()[-1]].text.strip()
        if not reference:
            raise DataError("the record's reference caption (its last assistant turn) is empty",
                            code="missing_reference", **where)
        key = _media_key(kind, ref)
        if key not in items:
            if limit is not None and len(items) >= limit:
                continue
            rid = conv.record_id if conv.record_id is not None else str(conv.index)
            try:
                image = open_image(ref, conv.image_root) if kind == "image" else None
                clip = read_video(ref, conv.image_root, sampling) if kind == "video" else None
            except DataError as e:   # the decoder names the image or video; add the file and record
                if e.file is not None:
                    raise
                raise DataError(e.problem, code=e.code, **where) from None
            items[key] = EvalItem(rid, image, [], _user_prompt(conv), video=clip, where=where)
        items[key].references.append(reference)
        items[key].sources.append(f"{conv.source}:{conv.index}")
    if n_records == 0:
        raise DataError("the eval file holds no records", file=str(path), code="empty")
    out = list(items.values())
    seen: dict[str, int] = {}
    for it in out:  # ids must be unique: they key the metrics
        if it.item_id in seen:
            seen[it.item_id] += 1
            it.item_id = f"{it.item_id}#{seen[it.item_id]}"
        else:
            seen[it.item_id] = 0
    return out
