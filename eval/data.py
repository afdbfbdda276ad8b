"""Eval items: one image, the prompt asked about it, and its reference captions.

Eval files are ordinary ShareGPT (``conversations``) or OpenAI ``messages`` records, read with
``vlm.data_formats`` (JSON / JSONL / parquet / a ``datasets`` folder). Each record gives an image,
a user prompt and the assistant's answer, which is the *reference caption*. Records naming the same
image are grouped into one item with several references (COCO-style data: five records per image),
in order of first appearance.

Errors are :class:`vlm.errors.DataError` naming the file and record: a record without an image,
a record without a reference caption, or a file with no records at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.errors import DataError


@dataclass
class EvalItem:
    """One image to caption. ``image`` is a decoded RGB PIL image."""

    item_id: str
    image: Any
    references: list[str]
    prompt: str | None = None           # the record's own user text (None: no text in the user turn)
    sources: list[str] = field(default_factory=list)   # "file:record" of every record merged here


def _image_key(ref) -> tuple[str, str]:
    if ref.kind in ("path", "data_url"):
        return ref.kind, str(ref.value)
    return ref.kind, str(id(ref.value))


def _user_prompt(conv) -> str | None:
    for turn in conv.turns:
        if turn.role == "user":
            text = turn.text.strip()
            return text or None
    return None


def read_eval_items(path: str | Path, *, image_root: str | None = None, limit: int | None = None) -> list[EvalItem]:
    """Read ``path`` into :class:`EvalItem` s (grouped by image), decoding every image once.

    Raises DataError when the file holds no records, a record has no image, or its reference
    (the last assistant turn) is empty.
    """
    from vlm.data_formats.images import open_image
    from vlm.data_formats.reader import iter_conversations

    path = Path(path)
    if not path.exists():
        raise DataError(f"eval data {path} does not exist (give a ShareGPT or messages JSON/JSONL file)",
                        file=str(path), code="missing_file")
    items: dict[tuple[str, str], EvalItem] = {}
    n_records = 0
    for conv in iter_conversations(str(path), image_root=image_root, validate_images=False):
        n_records += 1
        where = dict(file=conv.source or str(path), index=conv.index, record_id=conv.record_id)
        if not conv.images:
            raise DataError("the record has no image: caption evaluation needs one image per record "
                            "(add an 'image' field and an <image> placeholder)", code="no_image", **where)
        reference = conv.turns[conv.assistant_turn_indices()[-1]].text.strip()
        if not reference:
            raise DataError("the record's reference caption (its last assistant turn) is empty",
                            code="missing_reference", **where)
        key = _image_key(conv.images[0])
        if key not in items:
            if limit is not None and len(items) >= limit:
                continue
            image = open_image(conv.images[0], conv.image_root)
            rid = conv.record_id if conv.record_id is not None else str(conv.index)
            items[key] = EvalItem(rid, image, [], _user_prompt(conv))
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
