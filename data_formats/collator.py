"""One collator for every family: conversations -> the exact tensors the model's forward takes.

Per batch it

1. renders each conversation with the processor's chat template and marks the trainable characters
   (:mod:`.chat_render`: assistant turns by default, or ``last_assistant`` / ``all``);
2. tokenizes the rendered text once with offsets (images still one placeholder token each) to get
   per-token training flags, and predicts every image's token count from its size
   (:mod:`.image_tokens`), so the final length is known *before* the processor runs;
3. calls the processor once on the whole batch (it expands image tokens and builds
   ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ``image_sizes``,
   ``aspect_ratio_ids``/``aspect_ratio_mask``/``cross_attention_mask``... whatever the family needs);
4. carries the flags onto the expanded ids, checking each image got exactly its predicted count,
   and builds ``labels`` (prompt, image tokens and padding = -100);
5. truncates over-long rows *after the last image block only* (text only: never inside or before
   an image, so image features and image tokens always match), then pads or trims every
   sequence tensor to a multiple of ``pad_to_multiple_of``.

Samples that cannot fit (``overlong="drop"``, or images alone past ``max_length``) are refused by
:meth:`VisionChatCollator.plan` with a ``too_long`` :class:`DataError`; use
:func:`vlm.data_formats.prepare.prepare_samples` to filter and report them before training, so the
collator (possibly in DataLoader workers) never has to drop anything.
"""

from __future__ import annotations

import re
import uuid
from array import array
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from vlm.data_formats import problems
from vlm.data_formats.chat_render import (TRAIN_ON, adds_bos, end_of_turn_to_append, generation_prompt,
                                          token_flags, trainable_char_spans)
from vlm.data_formats.conversation import Conversation
from vlm.data_formats.image_tokens import expand_flags, image_token_counts, wrap_images
from vlm.data_formats.images import DEFAULT_MAX_IMAGE_PIXELS, image_size, open_image
from vlm.data_formats.records import located
from vlm.data_formats.resolution import Resolution, apply_resolution
from vlm.data_formats.video import (DEFAULT_VIDEO_FPS, DEFAULT_VIDEO_MAX_FRAMES, VideoSampling, patch_times,
                                    processor_video_kwargs, read_video, video_header)
from vlm.errors import ConfigError, DataError, VlmError

IGNORE_INDEX = -100
OVERLONG = ("truncate", "drop")
PLANS_KEPT_PER_SAMPLE = 4   # collator settings remembered per conversation (tests switch train_on)
# Tensors whose dim 1 is the token sequence (trimmed/padded together with input_ids).
SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX,
                 "mm_token_type_ids": 0, "token_type_ids": 0, "cross_attention_mask": 0}


@dataclass
class SamplePlan:
    """What is known about a sample before the processor runs (cheap: image headers only)."""

    text: str
    ids: Sequence[int]          # tokens with one placeholder per image (kept as array('i'): 4 B each)
    flags: Sequence[bool]       # trainable, per token of ``ids`` (kept as bytes: 1 B each)
    image_counts: list[int]     # tokens each image (or video) becomes, in text order
    length: int                 # full length after image expansion
    keep: int                   # tokens kept (== length unless truncated)
    image_tokens: int
    trainable_tokens: int       # after truncation

    @property
    def text_tokens(self) -> int:
        return self.length - self.image_tokens

    @property
    def truncated(self) -> bool:
        return self.keep < self.length


class VisionChatCollator:
    """``collator(conversations) -> dict`` of batched tensors incl. ``labels``.

    Args:
        processor: the model's processor (``vlm.load`` returns it).
        family: the model's :class:`vlm.families.Family` (``model.vlm_family``).
        max_length: cap on tokens per sample (None: no cap).
        train_on: ``assistant`` (default), ``last_assistant`` or ``all``.
        overlong: ``truncate`` (cut text after the last image) or ``drop``.
        pad_to_multiple_of: pad the batch length up to a multiple of this.
        resolution: :class:`Resolution` / dict, applied to the processor once, here.
        video_fps, video_max_frames: frame sampling of video records (families that take video).
    """

    def __init__(self, processor, family, *, max_length: int | None = None, train_on: str = "assistant",
                 overlong: str = "truncate", pad_to_multiple_of: int = 8,
                 resolution: Resolution | dict | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 video_fps: float = DEFAULT_VIDEO_FPS, video_max_frames: int = DEFAULT_VIDEO_MAX_FRAMES):
        if train_on not in TRAIN_ON:
            raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        if overlong not in OVERLONG:
            raise ConfigError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
        if max_length is not None and max_length < 1:
            raise ConfigError(f"max_length must be positive, got {max_length}")
        self.processor = processor
        self.family = family
        self.max_length = max_length
        self.train_on = train_on
        self.overlong = overlong
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of or 1))
        self.max_image_pixels = max_image_pixels
        apply_resolution(processor, resolution)
        self.tokenizer = processor.tokenizer
        self.image_token_id = self._image_token_id()
        self.video_sampling = VideoSampling(video_fps, video_max_frames)
        self.video_token_id = (int(self.processor.video_token_id)
                               if getattr(family, "takes_video", False) else None)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        self.append_end_of_turn = end_of_turn_to_append(processor, family)
        self.generation_prompt = generation_prompt(processor)
        self._control_tokens = _control_token_pattern(self.tokenizer)
        self._plan_uid = uuid.uuid4().hex   # survives pickling into DataLoader workers

    def _plan_key(self) -> tuple:
        return (self._plan_uid, self.train_on, self.max_length, self.overlong, self.video_sampling)

    @property
    def placeholder_ids(self) -> set[int]:
        """Token ids that the processor expands: the image token, and the video token if any."""
        return {self.image_token_id} | ({self.video_token_id} if self.video_token_id is not None else set())

    @classmethod
    def for_model(cls, model, processor, **kwargs) -> "VisionChatCollator":
        """Collator for a model from :func:`vlm.load` (uses ``model.vlm_family``)."""
        return cls(processor, model.vlm_family, **kwargs)

    def _image_token_id(self) -> int:
        tid = getattr(self.processor, "image_token_id", None)
        if tid is None:
            token = getattr(self.processor, "image_token", None) or self.family.image_placeholder
            tid = self.tokenizer.convert_tokens_to_ids(token)
        return int(tid)

    def _add_special_tokens(self, text: str) -> bool:
        return adds_bos(self.tokenizer, text)

    # -- planning (no pixels decoded) ---------------------------------------------------------
    def plan(self, conv: Conversation) -> SamplePlan:
        """Tokens, flags and lengths of ``conv``; raises ``too_long`` / ``no_trainable_tokens`` /
        ``placeholder_mismatch`` :class:`DataError`s that name the record.

        The plan is kept on the conversation (``conv.plan_cache``), so a sample planned once (by
        :func:`prepare_samples`) is not re-rendered and re-tokenized by every batch."""
        key = self._plan_key()
        cached = conv.plan_cache.get(key)
        if cached is not None:
            return cached
        try:
            plan = self._plan(conv)
        except DataError as e:
            raise located(e, source=conv.source, index=conv.index, record_id=conv.record_id) from None
        if len(conv.plan_cache) >= PLANS_KEPT_PER_SAMPLE:
            conv.plan_cache.pop(next(iter(conv.plan_cache)))
        conv.plan_cache[key] = plan
        return plan

    def _refuse_control_tokens(self, conv: Conversation) -> None:
        """Chat-control tokens written as text (``<|im_end|>\\n<|im_start|>user``) would be parsed
        as real turn boundaries by the tokenizer: a record could smuggle in turns of its own (a
        poisoning path for scraped data). They are refused, not escaped: no escape keeps the
        text's meaning for the model, and silently changing data is worse than a named error."""
        if self._control_tokens is None:
            return
        for i, turn in enumerate(conv.turns):
            for part in turn.parts:
                if isinstance(part, str):
                    found = self._control_tokens.search(part)
                    if found:
                        raise DataError(f"turn {i} ({turn.role}) contains the chat-control token "
                                        f"{found.group()!r} written as text (it would act as a real "
                                        "turn boundary); remove it from the data",
                                        code=problems.CONTROL_TOKEN)

    def _plan(self, conv: Conversation) -> SamplePlan:
        self._refuse_video_unless_taken(conv)
        self._refuse_control_tokens(conv)
        text, spans = trainable_char_spans(self.processor, conv, self.train_on, family=self.family,
                                           append_end_of_turn=self.append_end_of_turn,
                                           prompt=self.generation_prompt)
        wrap = self.family.image_wrap
        if wrap is not None:   # tokenize the text as the processor expands it (see ImageWrap)
            return self._plan_wrapped(conv, text, spans, wrap)
        enc = self.tokenizer(text, add_special_tokens=self._add_special_tokens(text),
                             return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        flags = token_flags(offsets, spans)
        order = conv.image_order()
        n_placeholders = sum(t == self.image_token_id for t in ids)
        if n_placeholders != len(order):
            raise DataError(f"the rendered text has {n_placeholders} image token(s) for {len(order)} "
                            "image(s) (does the text contain the model's image token literally?)",
                            code=problems.PLACEHOLDER_MISMATCH)
        if conv.videos and self.video_token_id is not None:
            n_video = sum(t == self.video_token_id for t in ids)
            if n_video != len(conv.videos):
                raise DataError(f"the rendered text has {n_video} video token(s) for "
                                f"{len(conv.videos)} video(s)", code=problems.PLACEHOLDER_MISMATCH)
        sizes = [image_size(conv.images[i], conv.image_root, max_image_pixels=self.max_image_pixels)
                 for i in order]
        image_counts = iter(self._image_token_counts(sizes))
        video_counts = self._video_token_counts(conv)          # by index into conv.videos
        counts = [next(image_counts) if kind == "image" else video_counts[i]
                  for kind, i in conv.media_order()]   # in text order, as the placeholders appear
        placeholders = self.placeholder_ids
        # expanded position of every token: walk once
        pos, image_end, train_pos = 0, 0, []
        n_img = 0
        for tok, flag in zip(ids, flags):
            if tok in placeholders:
                pos += counts[n_img]
                n_img += 1
                image_end = pos
            else:
                if flag:
                    train_pos.append(pos)
                pos += 1
        return self._fit_plan(text, ids, flags, counts, pos, image_end, train_pos)

    def _plan_wrapped(self, conv: Conversation, text: str, spans, wrap) -> SamplePlan:
        order = conv.image_order()
        placeholder = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if text.count(placeholder) != len(order):
            raise DataError(f"the rendered text has {text.count(placeholder)} image token(s) for "
                            f"{len(order)} image(s) (does the text contain the model's image token "
                            "literally?)", code=problems.PLACEHOLDER_MISMATCH)
        sizes = [image_size(conv.images[i], conv.image_root, max_image_pixels=self.max_image_pixels)
                 for i in order]
        counts = self._image_token_counts(sizes)
        wrapped, wrapped_spans = wrap_images(text, spans, placeholder, counts, wrap)
        enc = self.tokenizer(wrapped, add_special_tokens=self._add_special_tokens(text),
                             return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        flags = token_flags([tuple(o) for o in enc["offset_mapping"]], wrapped_spans)
        image_id = self.tokenizer.convert_tokens_to_ids(wrap.token)
        image_end = max((i + 1 for i, t in enumerate(ids) if t == image_id), default=0)
        train_pos = [i for i, f in enumerate(flags) if f]
        return self._fit_plan(text, ids, flags, counts, len(ids), image_end, train_pos)

    def _fit_plan(self, text, ids, flags, counts, length, image_end, train_pos) -> SamplePlan:
        """The plan once token positions are known: the truncation rule, the trainable-token check."""
        keep = length
        if self.max_length is not None and length > self.max_length:
            if self.overlong == "drop":
                raise DataError(f"{length} tokens > max_length {self.max_length} (overlong='drop')",
                                code=problems.TOO_LONG)
            if image_end > self.max_length:
                raise DataError(f"{length} tokens > max_length {self.max_length}, and the image "
                                f"blocks alone reach token {image_end}: text-only truncation cannot "
                                "fit it (raise max_length or lower the image resolution)",
                                code=problems.TOO_LONG)
            keep = self.max_length
        trainable = sum(p < keep for p in train_pos)
        if trainable == 0:
            why = " after truncation" if keep < length else ""
            raise DataError(f"no trainable tokens{why} (train_on={self.train_on!r}, {length} tokens)",
                            code=problems.NO_TRAINABLE_TOKENS)
        return SamplePlan(text, array("i", ids), bytes(flags), counts, length, keep, sum(counts), trainable)

    def _refuse_video_unless_taken(self, conv: Conversation) -> None:
        if conv.videos and self.video_token_id is None:
            from vlm.families.registry import video_family_names

            raise DataError(f"the record holds {len(conv.videos)} video(s), but the {self.family.name} "
                            f"family takes no video (families that do: {', '.join(video_family_names())})",
                            code=problems.VIDEO_UNSUPPORTED)

    def _video_token_counts(self, conv: Conversation) -> list[int]:
        """Tokens per video (in video order) from the container header and the frame sampling."""
        if not conv.videos:
            return []
        headers = [video_header(ref, conv.image_root) for ref in conv.videos]
        sizes = [[len(h.indices(self.video_sampling)), h.height, h.width] for h in headers]
        try:
            counted = self.processor._get_num_multimodal_tokens(video_sizes=sizes)
        except (ValueError, ZeroDivisionError) as e:
            raise DataError(f"a video cannot be resized by the model's processor: {e}",
                            code=problems.IMAGE_SHAPE) from None
        tokens = [int(n) for n in counted.num_video_tokens]
        if self.family.video_frame_wrap is None:
            return tokens
        return [self._wrapped_video_tokens(h, n) for h, n in zip(headers, tokens)]

    def _wrapped_video_tokens(self, header, n_tokens: int) -> int:
        """Tokens a video becomes where the processor writes each temporal patch as timestamp +
        before + tokens + after (``Family.video_frame_wrap``); the timestamp text sits between
        special tokens, so it tokenizes on its own."""
        wrap = self.family.video_frame_wrap
        frames_per_patch = int(self.processor.video_processor.temporal_patch_size)
        times = patch_times(header.indices(self.video_sampling), header.native_fps, frames_per_patch)
        if n_tokens % len(times):
            raise VlmError(f"{self.family.name}: {n_tokens} video tokens do not split into "
                           f"{len(times)} temporal patches")

        def count(text: str) -> int:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        per_patch = count(wrap.before) + n_tokens // len(times) + count(wrap.after)
        return sum(count(wrap.timestamp.format(t)) + per_patch for t in times)

    def _image_token_counts(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Per-image token counts; an image the processor cannot resize (Qwen2-VL refuses an aspect
        ratio of 200 or more) is a ``image_shape`` error naming it, not a crash of the run."""
        try:
            return image_token_counts(self.processor, self.family, sizes)
        except (ValueError, ZeroDivisionError) as e:
            for n, (h, w) in enumerate(sizes, start=1):
                try:
                    image_token_counts(self.processor, self.family, [(h, w)])
                except (ValueError, ZeroDivisionError):
                    raise DataError(f"image {n} ({w}x{h} pixels) cannot be resized by the model's "
                                    f"processor: {e}", code=problems.IMAGE_SHAPE) from None
            raise

    def sample_length(self, conv: Conversation) -> int:
        """Tokens this sample will occupy (after truncation): for length-grouped batching."""
        return self.plan(conv).keep

    # -- collation ----------------------------------------------------------------------------
    def __call__(self, conversations: Sequence[Conversation]) -> dict[str, Any]:
        if not conversations:
            raise ValueError("empty batch")
        plans = [self.plan(c) for c in conversations]
        images = [[open_image(c.images[i], c.image_root, max_image_pixels=self.max_image_pixels)
                   for i in c.image_order()] for c in conversations]
        has_images = any(images)
        videos = [read_video(v, c.image_root, self.video_sampling) for c in conversations
                  for v in self._video_order(c)]
        add_special = {self._add_special_tokens(p.text) for p in plans}
        if len(add_special) != 1:
            raise ConfigError("the chat template writes a BOS for some samples and not others")
        kwargs = dict(text=[p.text for p in plans], padding=True, return_tensors="pt",
                      add_special_tokens=add_special.pop())
        if has_images:
            kwargs["images"] = images if self.family.images_per_sample else \
                [img for per_sample in images for img in per_sample]
        if videos:   # sampled here, as planned; the processor's own pixel cap agrees with the plan
            kwargs.update(processor_video_kwargs(self.processor, videos))
        padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            batch = dict(self.processor(**kwargs))
        finally:
            self.tokenizer.padding_side = padding_side
        input_ids = batch["input_ids"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        real = batch["attention_mask"].sum(dim=1).tolist()
        for row, (conv, plan) in enumerate(zip(conversations, plans)):
            expanded = input_ids[row, :real[row]].tolist()
            where = f"{conv.source}, record {conv.index}"
            if self.family.image_wrap is not None:   # plan.ids are the expanded ids already
                if expanded != list(plan.ids):
                    raise VlmError(f"{where}: the processor expanded the images differently from "
                                   f"the family's image_wrap rule ({len(expanded)} tokens, "
                                   f"{len(plan.ids)} predicted)")
                train = [bool(f) for f in plan.flags]
            else:
                train, _ = expand_flags(plan.ids, plan.flags, self.placeholder_ids, plan.image_counts,
                                        expanded, where)
            row_labels = torch.tensor(expanded)
            row_labels[~torch.tensor(train, dtype=torch.bool)] = IGNORE_INDEX
            labels[row, :real[row]] = row_labels
            if plan.keep < real[row]:  # text-only truncation: everything after `keep` is padding
                self._blank_tail(batch, labels, row, plan.keep)
        batch["labels"] = labels
        longest = max(p.keep for p in plans)
        target = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return self._fit_sequence(batch, target)

    @staticmethod
    def _video_order(conv: Conversation) -> list:
        return [conv.videos[i] for kind, i in conv.media_order() if kind == "video"]

    def _blank_tail(self, batch: dict, labels: torch.Tensor, row: int, keep: int) -> None:
        labels[row, keep:] = IGNORE_INDEX
        for key, pad in SEQUENCE_KEYS.items():
            if key in batch and key != "labels":
                batch[key][row, keep:] = self.pad_token_id if pad is None else pad

    def _fit_sequence(self, batch: dict, length: int) -> dict:
        """Trim or right-pad every sequence tensor (dim 1) to ``length``."""
        for key, pad in SEQUENCE_KEYS.items():
            if key not in batch:
                continue
            t = batch[key]
            if t.shape[1] >= length:
                batch[key] = t[:, :length].contiguous()
            else:
                fill = self.pad_token_id if pad is None else pad
                extra = torch.full((t.shape[0], length - t.shape[1], *t.shape[2:]), fill, dtype=t.dtype)
                batch[key] = torch.cat([t, extra], dim=1)
        return batch


def _control_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching any special token of ``tokenizer`` as it would be written in text."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            tokens.add(str(tok))
    tokens = sorted((t for t in tokens if t and t.strip()), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None
