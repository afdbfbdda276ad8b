"""The model side of packed rows (``vlm.data_formats.packing``): positions and a block-diagonal mask.

A packed batch arrives with ``position_ids`` (B, L) that restart at 0 where each sample starts, and
an ``attention_mask`` that only marks the padding tail. :func:`enable` hooks the multimodal model
(the module that owns the language model and, for Qwen2-VL, ``get_rope_index``) so that, for such a
batch,

- ``attention_mask`` becomes None and ``use_cache`` False, and the samples' boundaries (where the
  positions restart) go to every attention call as ``cu_seq_lens_q/k``: attention runs per sample
  without any mask (:mod:`vlm.train.varlen_attention`: flash-attention varlen on the GPU, one SDPA
  per sample elsewhere). For a family whose language attention is not purely causal (Gemma 3:
  images attend both ways), transformers derives the sample of every token from the same position
  resets (``masking_utils.find_packed_sequence_indices``: ``seq = cumsum(diff(position_ids) != 1)``)
  and builds the mask ``causal(q, k) ∧ seq[q] = seq[k]`` (plus its image blocks) instead;
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


def row_spans(bounds: list[int], row_length: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample, from the flattened boundaries of
    :func:`vlm.train.varlen_attention.segment_boundaries` (a segment never crosses a row)."""
    return [(a // row_length, a % row_length, a % row_length + (b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


def mrope_positions(mm_model, input_ids: torch.Tensor, text_positions: torch.Tensor, spans,
                    mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                    **video) -> torch.Tensor:
    """(4, B, L): text positions, then the model's M-RoPE (t, h, w) positions of each sample
    (``spans``: :func:`row_spans`). ``video``: ``video_grid_thw`` (and Qwen2.5-VL's ``second_per_grid_ts``), consumed in token order
    like the image grids."""
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


class PackedForward:
    """The hooks :func:`enable` installed; ``.remove()`` puts the model back as it was."""

    def __init__(self, handles, restore_attention, varlen_refusal):
        self._handles, self._restore_attention = handles, restore_attention
        self.varlen = restore_attention is not None
        self.varlen_refusal = varlen_refusal   # why packed rows keep the block mask, or None

    def remove(self):
        for handle in self._handles:
            handle.remove()
        if self._restore_attention is not None:
            self._restore_attention()
        self._handles, self._restore_attention = [], None


def max_segment_length(bounds: list[int], row_length: int) -> int:
    """The longest segment rounded up to 256 tokens (at most the row): the varlen kernels size their
    grid by it, and rounding keeps compiled layers on one value for most batches."""
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return min(row_length, -(-longest // 256) * 256)


def enable(model, family, *, varlen: bool = True, cuda_graphs: bool = False) -> PackedForward:
    """Hook ``model`` so packed batches run with per-sample positions and attention; returns the
    hooks (``.remove()`` them after training). With ``varlen`` (and a family whose language
    attention is purely causal: :func:`vlm.train.varlen_attention.refusal`) attention runs over the
    samples' boundaries (:mod:`vlm.train.varlen_attention`) instead of an L×L block mask; the kernels
    are sized by the longest sample, or by the row under ``cuda_graphs`` (a replayed graph takes no
    CPU input). Raises
    :class:`ConfigError` for a family that cannot pack (:func:`vlm.data_formats.packing.packing_refusal`)."""
    from vlm.train import varlen_attention

    refusal = packing_refusal(family)
    if refusal is not None:
        raise ConfigError(f"packing: {refusal}")
    mm_model = multimodal_model(model, family)
    mrope = family.language_kernels.rope.startswith("mrope")
    varlen_refusal = varlen_attention.refusal(family, model) if varlen else "varlen attention switched off"
    restore_attention = varlen_attention.install(model, family) if varlen_refusal is None else None

    def packed_forward(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is None or positions.ndim != 2 or kwargs.get("past_key_values") is not None:
            return None
        kwargs["attention_mask"] = None
        kwargs["use_cache"] = False
        bounds = varlen_attention.segment_boundaries(positions)   # one host read of the positions
        if restore_attention is not None:
            cu_seqlens = varlen_attention.padded_boundaries(bounds, positions.device)
            longest = max_segment_length(bounds, positions.shape[-1])
            kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens)
            if not cuda_graphs:
                kwargs["vlm_max_seqlen"] = varlen_attention.max_length_tensor(longest)
            varlen_attention.set_packed(True)
        if mrope:
            if kwargs.get("mm_token_type_ids") is None:
                raise ValueError("packed M-RoPE batch without mm_token_type_ids (the collator adds them)")
            kwargs["position_ids"] = mrope_positions(module, kwargs["input_ids"], positions,
                                                     row_spans(bounds, positions.shape[-1]),
                                                     kwargs["mm_token_type_ids"], kwargs.get("image_grid_thw"),
                                                     video_grid_thw=kwargs.get("video_grid_thw"),
                                                     second_per_grid_ts=kwargs.get("second_per_grid_ts"))
        return args, kwargs

    def forward_done(module, args, kwargs, output):
        varlen_attention.set_packed(False)

    handles = [mm_model.register_forward_pre_hook(packed_forward, with_kwargs=True)]
    if restore_attention is not None:
        handles.append(mm_model.register_forward_hook(forward_done, with_kwargs=True, always_call=True))
    return PackedForward(handles, restore_attention, varlen_refusal)
