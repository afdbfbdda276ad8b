"""Greedy captions from a local model, with the same decoding for every variant, plus memory/speed.

Decoding is fixed: greedy (``do_sample=False, num_beams=1``), one prompt per image or video, ``max_new_tokens``
(and optionally ``min_new_tokens``, to compare with a vLLM server's ``min_tokens``). Batches are
left-padded and formed in the same order for every variant, so two loads of the same weights give
the same tokens.

Measured per variant:
- ``model_bytes``: Σ over parameters and buffers of numel × element size (packed 4-bit weights count
  as their uint8 storage), plus bitsandbytes' quantization state tensors (absmax, code) when present.
- ``peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` during generation (model included);
  on CPU, the peak resident-set size sampled every 5 ms during generation minus the RSS before it
  (what generation adds on top of the loaded model; approximate).
- ``tokens_per_s``: generated tokens (up to and including EOS, padding excluded) / wall seconds of
  the ``generate`` calls (processor time excluded).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

DEFAULT_PROMPT = "Describe this image in one sentence."
DEFAULT_VIDEO_PROMPT = "Describe this video in one sentence."


@dataclass
class GenerationSettings:
    """What makes decoding identical across variants (and with an endpoint)."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    batch_size: int = 8
    prompt: str | None = None   # None: each item's own prompt, else DEFAULT_PROMPT


@dataclass
class GenerationResult:
    captions: list[str]
    num_tokens: list[int]
    seconds: float
    model_bytes: int | None
    peak_bytes: int | None
    peak_kind: str            # "cuda_max_allocated" | "cpu_rss_delta" | "n/a"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        return sum(self.num_tokens) / self.seconds if self.seconds > 0 else None


def prompt_for(item, settings: GenerationSettings) -> str:
    """The one prompt of ``settings``, else the record's own user text, else the default for its media."""
    default = DEFAULT_VIDEO_PROMPT if getattr(item, "video", None) is not None else DEFAULT_PROMPT
    return settings.prompt or getattr(item, "prompt", None) or default


def item_media(item) -> str:
    """``"video"`` for an item carrying a video, else ``"image"``."""
    return "video" if getattr(item, "video", None) is not None else "image"


def chat_text(processor, prompt: str, media: str = "image") -> str:
    """The family's chat template applied to one user turn (the image or video first, then the prompt)."""
    messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def item_chat_text(processor, item, settings: GenerationSettings) -> str:
    return chat_text(processor, prompt_for(item, settings), item_media(item))


def model_device(model) -> torch.device:
    return next(p.device for p in model.parameters())


def model_bytes(model) -> int:
    """Parameters + buffers (storage bytes) + bitsandbytes quant-state tensors."""
    total = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for sub in (qs, getattr(qs, "state2", None)):
                for name in ("absmax", "code"):
                    v = getattr(sub, name, None) if sub is not None else None
                    if isinstance(v, torch.Tensor):
                        total += v.numel() * v.element_size()
    return total


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager measuring peak memory of the block (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None
        self.kind = "n/a"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        else:
            self._base = _rss_bytes()
            if self._base is not None:
                self.kind = "cpu_rss_delta"
                self._max = self._base
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            rss = _rss_bytes() or 0
            self._max = max(self._max, rss)

    def __exit__(self, *exc):
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.kind == "cpu_rss_delta":
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes() or 0)
            self.peak = int(self._max - self._base)
        return False


def _eos_ids(model, processor) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = processor.tokenizer.eos_token_id
    return set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])


def _count_tokens(row: torch.Tensor, eos: set[int]) -> int:
    """Generated tokens up to and including the first EOS (the rest is padding)."""
    for i, t in enumerate(row.tolist()):
        if t in eos:
            return i + 1
    return row.numel()


def processor_images(model, images: Sequence) -> list:
    """One image per item, as the family's processor takes them: a list per sample where the family
    says so (``images_per_sample``: Mllama, Gemma 3), else one flat list."""
    family = getattr(model, "vlm_family", None)
    if family is None and hasattr(model, "get_base_model"):
        family = getattr(model.get_base_model(), "vlm_family", None)
    return [[im] for im in images] if getattr(family, "images_per_sample", False) else list(images)


def processor_inputs(model, processor, texts: list[str], items: Sequence):
    """The processor's tensors for ``texts`` (one per item): image items' images and video items'
    clips, each list in item order, which is the order their placeholders take in the batch text
    (the processor fills placeholders in order). No BOS is added to a text whose template wrote one.
    Video clips go in as sampled at read time,
    with the same keyword arguments as training (:func:`~vlm.data_formats.video.processor_video_kwargs`)."""
    from vlm.data_formats.chat_render import adds_bos
    from vlm.data_formats.video import processor_video_kwargs

    # one BOS: none added where the template wrote it (the collator's and vLLM's rule)
    kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True,
                                  add_special_tokens=all(adds_bos(processor.tokenizer, t) for t in texts))
    images = [it.image for it in items if item_media(it) == "image"]
    clips = [it.video for it in items if item_media(it) == "video"]
    if images:
        kwargs["images"] = processor_images(model, images)
    if clips:
        kwargs.update(processor_video_kwargs(processor, clips))
    return processor(**kwargs)


@torch.inference_mode()
def generate_captions(model, processor, items: Sequence, settings: GenerationSettings) -> GenerationResult:
    """Greedy captions for ``items`` (objects with ``.image`` and ``.prompt``, and ``.video`` for a
    video item: :class:`vlm.eval.data.EvalItem`), in order."""
    device = model_device(model)
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"   # generation appends on the right: prompts must end aligned
    eos = _eos_ids(model, processor)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)
    captions: list[str] = []
    counts: list[int] = []
    seconds = 0.0
    try:
        with PeakMemory(device) as peak:
            for start in range(0, len(items), settings.batch_size):
                batch = items[start:start + settings.batch_size]
                texts = [item_chat_text(processor, it, settings) for it in batch]
                inputs = processor_inputs(model, processor, texts, batch).to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                out = model.generate(**inputs, do_sample=False, num_beams=1,
                                     max_new_tokens=settings.max_new_tokens,
                                     min_new_tokens=settings.min_new_tokens or None,
                                     temperature=None, top_p=None, top_k=None, pad_token_id=pad_id)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - t0
                new = out[:, inputs["input_ids"].shape[1]:].cpu()
                counts.extend(_count_tokens(row, eos) for row in new)
                captions.extend(c.strip() for c in processor.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
    return GenerationResult(captions, counts, seconds, model_bytes(model), peak.peak, peak.kind)
