"""How many tokens each image becomes, known before tokenizing, and the check that it was so.

Counts come from the processor itself (``_get_num_multimodal_tokens``, the hook vLLM uses to plan
placeholders): Qwen2-VL grid-dependent ``t·h·w / merge²``, LLaVA a fixed count, Pixtral
``rows × (cols + 1)`` including ``[IMG_BREAK]``/``[IMG_END]``. Families whose images enter through
cross-attention (Mllama, ``family.cross_attention_images``) keep one token per image.

:func:`expand_flags` walks the unexpanded token ids (one placeholder token per image) beside the
processor's expanded ids and carries the per-token training flags across, checking on the way
that every image took exactly its predicted number of tokens and that all other tokens are equal.
So a count mismatch ("image features and image tokens do not match") is caught here, naming the
record, before the model could see it.
"""

from __future__ import annotations

from typing import Collection, Sequence

from vlm.errors import VlmError


def image_token_counts(processor, family, image_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Tokens per image for images of ``(height, width)``, at the processor's current resolution."""
    if not image_sizes:
        return []
    if family is not None and family.cross_attention_images:
        return [1] * len(image_sizes)
    counter = getattr(processor, "_get_num_multimodal_tokens", None)
    if counter is None:
        raise VlmError(f"{type(processor).__name__} cannot predict image-token counts "
                       "(no _get_num_multimodal_tokens); this family needs a count rule")
    return [int(n) for n in counter(image_sizes=[list(s) for s in image_sizes]).num_image_tokens]


def wrap_images(text: str, spans: Sequence[tuple[int, int]], placeholder: str, counts: Sequence[int],
                wrap) -> tuple[str, list[tuple[int, int]]]:
    """The text as the processor expands it for a family with an ``ImageWrap`` (Gemma 3): each
    ``placeholder`` becomes ``wrap.before + placeholder + wrap.token * n + wrap.after``. Character
    spans after an insertion move with it. Raises if placeholders and counts differ in number."""
    pieces = text.split(placeholder)
    if len(pieces) - 1 != len(counts):
        raise VlmError(f"{len(pieces) - 1} image placeholder(s) {placeholder!r} in the text for "
                       f"{len(counts)} image(s)")
    out, inserts, pos = [pieces[0]], [], len(pieces[0])   # inserts: (original position, added chars)
    for n, piece in zip(counts, pieces[1:]):
        after = wrap.token * n + wrap.after
        out += [wrap.before, placeholder, after, piece]
        inserts += [(pos, len(wrap.before)), (pos + len(placeholder), len(after))]
        pos += len(placeholder) + len(piece)

    def moved(i: int, is_end: bool) -> int:
        return i + sum(d for p, d in inserts if p < i or (p == i and not is_end))

    return "".join(out), [(moved(s, False), moved(e, True)) for s, e in spans]


def expand_flags(unexpanded: Sequence[int], flags: Sequence[bool], image_token_id: int | Collection[int],
                 counts: Sequence[int], expanded: Sequence[int], where: str = "") -> tuple[list[bool], list[bool]]:
    """Map flags onto the expanded ids. Returns ``(train_flags, is_image_token)`` per expanded token.

    ``image_token_id`` may be several ids (image and video placeholders); ``counts`` then follow
    the placeholders in text order. Raises :class:`VlmError` if the expansion differs from the
    prediction in any way.
    """
    placeholders = {image_token_id} if isinstance(image_token_id, int) else set(image_token_id)
    train: list[bool] = []
    image: list[bool] = []
    j = 0
    n_img = 0
    for i, tok in enumerate(unexpanded):
        if tok in placeholders:
            if n_img >= len(counts):
                raise VlmError(f"{where}: more image placeholders in the text than images ({len(counts)})")
            n = counts[n_img]
            # the block holds the placeholder token (first, or after the text a family writes
            # around each video patch: Family.video_frame_wrap)
            if j + n > len(expanded) or tok not in expanded[j:j + n]:
                raise VlmError(f"{where}: image {n_img + 1} expected {n} tokens at position {j}; "
                               "the processor expanded it differently")
            train.extend([False] * n)
            image.extend([True] * n)
            j += n
            n_img += 1
            continue
        if j >= len(expanded) or expanded[j] != tok:
            raise VlmError(f"{where}: token {i} ({tok}) differs after image expansion (got "
                           f"{expanded[j] if j < len(expanded) else 'end'}): predicted image-token "
                           "counts do not match the processor")
        train.append(bool(flags[i]))
        image.append(False)
        j += 1
    if j != len(expanded) or n_img != len(counts):
        raise VlmError(f"{where}: {len(expanded) - j} unexplained tokens / {len(counts) - n_img} images "
                       "unused after expansion")
    return train, image
