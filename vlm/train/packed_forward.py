"""The model side of packed rows (``vlm.data_formats.packing``): positions and a block-diagonal mask.

A packed batch arrives with ``position_ids`` (B, L) that restart at 0 where each sample starts, and
an ``attention_mask`` that only marks the padding tail. :func:`enable` hooks the multimodal model
(the module that owns the language model and, for Qwen2-VL, ``get_rope_index``) so that, for such a
batch,

- ``attention_mask`` becomes None and ``use_cache`` False: transformers then derives the sample of
  every token from the position resets (``masking_utils.find_packed_sequence_indices``:
  ``seq = cumsum(diff(position_ids) != 1)``) and builds the mask ``causal(q, k) ∧ seq[q] = seq[k]``
  on every attention backend (eager, SDPA, flex; flash-attention takes the same resets as varlen
  ``cu_seq_lens``). Nothing is built by hand here;
- for M-RoPE families (``family.language_kernels.rope`` "mrope"…: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) the three rotary
  axes (temporal, height, width) are computed per sample by the model's own ``get_rope_index`` — one
  call over the samples stacked as rows, which consumes ``image_grid_thw`` / ``video_grid_thw`` in
  token order exactly as the packed row does — and concatenated; the 1-D text positions go in front as row 0, the layout
  (4, B, L) by which Qwen2-VL's text model recognises packed input.

A forward with a KV cache (generation) or without 2-D ``position_ids`` passes through untouched.
"""

from __future__ import annotations

import torch

from vlm.data_formats.packing import packing_refusal
from vlm.errors import ConfigError


def multimodal_model(model, family):
    """The module holding the language model (``model.model`` in transformers 5 VLMs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language = family.component_prefixes["language"][0]
    return base.get_submodule(language.rsplit(".", 1)[0]) if "." in language else base


def segments(text_positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of every sample of one packed row: a new sample wherever the position does not
    follow the previous one by 1 (the same rule transformers' mask uses)."""
    starts = [0] + [int(i) for i in (torch.diff(text_positions) != 1).nonzero().flatten() + 1]
    ends = starts[1:] + [int(text_positions.numel())]
    return list(zip(starts, ends))


def mrope_positions(mm_model, input_ids: torch.Tensor, text_positions: torch.Tensor,
                    mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                    **video) -> torch.Tensor:
    """(4, B, L): text positions, then the model's M-RoPE (t, h, w) positions of each sample.
    ``video``: ``video_grid_thw`` (and Qwen2.5-VL's ``second_per_grid_ts``), consumed in token order
    like the image grids."""
    spans = [(b, s, e) for b in range(input_ids.shape[0]) for s, e in segments(text_positions[b])]
    width = max(e - s for _, s, e in spans)
    ids = input_ids.new_zeros((len(spans), width))
    types = mm_token_type_ids.new_zeros((len(spans), width))
    real = torch.zeros((len(spans), width), dtype=torch.long, device=input_ids.device)
    for k, (b, s, e) in enumerate(spans):
        ids[k, :e - s] = input_ids[b, s:e]
        types[k, :e - s] = mm_token_type_ids[b, s:e]
        real[k, :e - s] = 1
    per_sample, _ = mm_model.get_rope_index(input_ids=ids, mm_token_type_ids=types,
                                            image_grid_thw=image_grid_thw, attention_mask=real,
                                            **{k: v for k, v in video.items() if v is not None})
    out = text_positions.new_zeros((4, *input_ids.shape))
    out[0] = text_positions
    for k, (b, s, e) in enumerate(spans):
        out[1:, b, s:e] = per_sample[:, k, :e - s].to(out.dtype)
    return out


def enable(model, family):
    """Hook ``model`` so packed batches run with per-sample positions and attention; returns the
    hook handle (``.remove()`` it after training). Raises :class:`ConfigError` for a family that
    cannot pack (:func:`vlm.data_formats.packing.packing_refusal`)."""
    refusal = packing_refusal(family)
    if refusal is not None:
        raise ConfigError(f"packing: {refusal}")
    mm_model = multimodal_model(model, family)
    mrope = family.language_kernels.rope.startswith("mrope")

    def packed_forward(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is None or positions.ndim != 2 or kwargs.get("past_key_values") is not None:
            return None
        kwargs["attention_mask"] = None
        kwargs["use_cache"] = False
        if mrope:
            if kwargs.get("mm_token_type_ids") is None:
                raise ValueError("packed M-RoPE batch without mm_token_type_ids (the collator adds them)")
            kwargs["position_ids"] = mrope_positions(module, kwargs["input_ids"], positions,
                                                     kwargs["mm_token_type_ids"], kwargs.get("image_grid_thw"),
                                                     video_grid_thw=kwargs.get("video_grid_thw"),
                                                     second_per_grid_ts=kwargs.get("second_per_grid_ts"))
        return args, kwargs

    return mm_model.register_forward_pre_hook(packed_forward, with_kwargs=True)
