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
  axes (temporal, height, width) of each sample are the model's own ``get_rope_index``'s, laid out
  (4, B, L) with the 1-D text positions in front (:mod:`vlm.train.mrope_positions`).

The packing collator ships both the boundaries and the M-RoPE positions with the batch, computed on
CPU (:data:`vlm.data_formats.packing.SEGMENT_KEYS`; :func:`collator_positions` gives it the model's
rope rule): the hook then only moves them into place — no read of GPU memory back to the host, no
rope-index kernels in the step. A packed batch without them (built elsewhere) gets the same values
computed here, from the positions, with one host read (``segment_boundaries``) and the rope index
run on the model's device.

A forward with a KV cache (generation) or without 2-D ``position_ids`` passes through untouched.
"""

from __future__ import annotations

import functools

from vlm.data_formats.packing import CU_SEQLENS, MAX_SEQLEN, MROPE_POSITIONS, SEGMENT_KEYS, packing_refusal
from vlm.data_formats.segments import max_segment_length, padded_boundaries, segment_boundaries
from vlm.errors import ConfigError
from vlm.train.mrope_positions import ModelRopeIndex, packed_mrope_positions


def multimodal_model(model, family):
    """The module holding the language model (``model.model`` in transformers 5 VLMs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language = family.component_prefixes["language"][0]
    return base.get_submodule(language.rsplit(".", 1)[0]) if "." in language else base


def collator_positions(model, family):
    """For the packing collator (``PackingCollator(mrope_positions=...)``): the M-RoPE positions of a
    packed batch computed on CPU by the model's own ``get_rope_index``
    (:class:`vlm.train.mrope_positions.ModelRopeIndex`); None for a family with 1-D positions."""
    if not family.language_kernels.rope.startswith("mrope"):
        return None
    mm_model = multimodal_model(model, family)
    return functools.partial(packed_mrope_positions, ModelRopeIndex(type(mm_model), mm_model.config))


class PackedForward:
    """The hooks :func:`enable` installed; ``.remove()`` puts the model back as it was."""

    def __init__(self, handles, restore_attention, varlen_refusal, prepare):
        self._handles, self._restore_attention = handles, restore_attention
        self.prepare = prepare   # the pre-hook itself: (module, args, kwargs) -> (args, kwargs) or None
        self.varlen = restore_attention is not None
        self.varlen_refusal = varlen_refusal   # why packed rows keep the block mask, or None

    def remove(self):
        for handle in self._handles:
            handle.remove()
        if self._restore_attention is not None:
            self._restore_attention()
        self._handles, self._restore_attention = [], None


def enable(model, family, *, varlen: bool = True, cuda_graphs: bool = False) -> PackedForward:
    """Hook ``model`` so packed batches run with per-sample positions and attention; returns the
    hooks (``.remove()`` them after training). With ``varlen`` (and a family whose language
    attention is purely causal: :func:`vlm.train.varlen_attention.refusal`) attention runs over the
    samples' boundaries (:mod:`vlm.train.varlen_attention`) instead of an L×L block mask; the kernels
    are sized by the longest sample, or by the row under ``cuda_graphs`` (a replayed graph takes no
    CPU input). The boundaries and M-RoPE positions a batch ships
    (:data:`vlm.data_formats.packing.SEGMENT_KEYS`) are used and popped; a packed batch without them
    gets them computed here. Raises
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
        shipped = {key: kwargs.pop(key) for key in SEGMENT_KEYS if key in kwargs}   # never reach the model
        positions = kwargs.get("position_ids")
        if positions is None or positions.ndim != 2 or kwargs.get("past_key_values") is not None:
            return (args, kwargs) if shipped else None
        kwargs["attention_mask"] = None
        kwargs["use_cache"] = False
        row = positions.shape[-1]

        @functools.cache
        def bounds():   # only for a batch that came without them: one host read of the positions
            return segment_boundaries(positions)

        if restore_attention is not None:
            if CU_SEQLENS in shipped and MAX_SEQLEN in shipped:
                cu_seqlens = shipped[CU_SEQLENS].to(positions.device, non_blocking=True)
                longest = int(shipped[MAX_SEQLEN])
            else:
                cu_seqlens = padded_boundaries(bounds(), positions.device)
                longest = max_segment_length(bounds(), row)
            kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens)
            if not cuda_graphs:
                kwargs["vlm_max_seqlen"] = varlen_attention.max_length_tensor(longest)
            varlen_attention.set_packed(True)
        if mrope:
            if MROPE_POSITIONS in shipped:
                kwargs["position_ids"] = shipped[MROPE_POSITIONS].to(positions.device, non_blocking=True)
            else:
                kwargs["position_ids"] = packed_mrope_positions(module.get_rope_index, kwargs, bounds())
        return args, kwargs

    def forward_done(module, args, kwargs, output):
        varlen_attention.set_packed(False)

    handles = [mm_model.register_forward_pre_hook(packed_forward, with_kwargs=True)]
    if restore_attention is not None:
        handles.append(mm_model.register_forward_hook(forward_done, with_kwargs=True, always_call=True))
    return PackedForward(handles, restore_attention, varlen_refusal, packed_forward)
