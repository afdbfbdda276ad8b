"""The model side of packed rows (``vlm.data_formats.packing``): positions and a block-diagonal mask.

A packed batch arrives with ``position_ids`` (B, L) that restart at 0 where each sample starts, and
an ``attention_mask`` that only marks the padding tail. :func:`enable` hooks the multimodal model
(the module that owns the language model and, for Qwen2-VL, ``get_rope_index``) so that, for such a
batch,

- ``use_cache`` becomes False, and the samples' boundaries (where the positions restart) go to
  every attention call as ``cu_seq_lens_q/k``: attention runs per sample without any mask
  (:mod:`vlm.train.varlen_attention`: flash-attention varlen on the GPU, one SDPA per sample
  elsewhere; the 2-D padding mask stays only so that transformers' mask creation skips its
  packed-sequence detection, a host read: no mask is built from it). For a family whose language attention is not purely causal (Gemma 3:
  images attend both ways), transformers derives the sample of every token from the same position
  resets (``masking_utils.find_packed_sequence_indices``: ``seq = cumsum(diff(position_ids) != 1)``;
  ``attention_mask`` becomes None for that) and builds the mask ``causal(q, k) ∧ seq[q] = seq[k]``
  (plus its image blocks) instead;
- for M-RoPE families (``family.language_kernels.rope`` "mrope"…: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) the three rotary
  axes (temporal, height, width) of each sample are the model's own ``get_rope_index``'s, laid out
  (4, B, L) with the 1-D text positions in front (:mod:`vlm.train.mrope_positions`).

The packing collator ships both the boundaries and the M-RoPE positions with the batch, computed on
CPU (:data:`vlm.data_formats.packing.SEGMENT_KEYS`; :func:`collator_positions` gives it the model's
rope rule): the hook then only moves them into place — no read of GPU memory back to the host, no
rope-index kernels in the step. The batch's host copies of image grids and sizes replace the device
tensors where transformers reads them element by element (:func:`_host_copies_wanted`), and
``get_placeholder_mask`` runs without its feature-count check (:func:`placeholder_mask_without_check`),
Qwen3-VL's DeepStack sum without a boolean index (:func:`deepstack_without_read`). A packed batch
without them (built elsewhere) gets the same values computed here, from the positions, with one host
read (``segment_boundaries``) and the rope index run on the model's device.

A forward with a KV cache (generation) or without 2-D ``position_ids`` passes through untouched.
"""

from __future__ import annotations

import functools

import torch

from vlm.data_formats.packing import (CU_SEQLENS, HOST_INPUTS, MAX_SEQLEN, MROPE_POSITIONS, SEGMENT_KEYS,
                                      packing_refusal)
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

    def __init__(self, handles, restore_attention, varlen_refusal, prepare, restores=()):
        self._handles, self._restore_attention = handles, restore_attention
        self._restores = [r for r in restores if r is not None]
        self.prepare = prepare   # the pre-hook itself: (module, args, kwargs) -> (args, kwargs) or None
        self.varlen = restore_attention is not None
        self.varlen_refusal = varlen_refusal   # why packed rows keep the block mask, or None

    def remove(self):
        for handle in self._handles:
            handle.remove()
        for restore in [self._restore_attention, *self._restores]:
            if restore is not None:
                restore()
        self._handles, self._restore_attention, self._restores = [], None, []


def placeholder_mask_without_check(mm_model):
    """Put on ``mm_model`` (the instance) a ``get_placeholder_mask`` that returns transformers' masks
    without its feature-count check; returns the function that takes it off.

    transformers' check compares ``(input_ids == image_token).sum()`` with the features' size and
    formats that count into its message before knowing whether it fails: two host reads of a device
    value per modality per micro-batch. Where the method takes the features as optional (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL: ``image_features=None`` skips the check), it is called without them; where
    they are required (the LLaVA layout: LLaVA, Pixtral, Gemma 3, Mistral 3) the mask is its own
    formula, ``(input_ids == config.image_token_id).unsqueeze(-1)``. The check moves to where a
    mismatch can name its record: the collator verifies that every image (and video) got exactly
    the token count its size predicts (``vlm.data_formats.collator``) and drops an image only
    together with its tokens."""
    import inspect

    original = mm_model.get_placeholder_mask
    optional = inspect.signature(original).parameters["image_features"].default is None

    def get_placeholder_mask(input_ids, inputs_embeds=None, image_features=None, video_features=None, **kwargs):
        if optional:
            return original(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if input_ids is None:   # embeddings given instead of ids: transformers' path, check included
            return original(input_ids, inputs_embeds, image_features, **kwargs)
        return (input_ids == mm_model.config.image_token_id).unsqueeze(-1).to(inputs_embeds.device)

    mm_model.get_placeholder_mask = get_placeholder_mask
    return lambda: mm_model.__dict__.pop("get_placeholder_mask", None)


def deepstack_without_read(model, family):
    """Qwen3-VL adds its DeepStack features to the visual tokens' hidden states in the first decoder
    layers: ``h[mask] = h[mask] + e`` (``_deepstack_process``), a boolean index whose size the GPU
    must report to the host (a ``nonzero``), forward and backward, per DeepStack layer. The same
    sum as ``h.view(-1, d).index_add(0, i, e)`` with ``i = nonzero_static(mask, size=len(e))``: the
    count of visual tokens is the features' row count, a shape the host knows, so nothing waits
    (gradients: identity for h, ``grad[i]`` for e, as before). Put on the language model instance;
    returns the function that takes it off (None where the model has no DeepStack)."""
    language = family.component_roots(model, "language")[0][1]
    if not hasattr(language, "_deepstack_process"):
        return None

    def _deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
        index = torch.nonzero_static(visual_pos_masks.to(hidden_states.device).reshape(-1),
                                     size=visual_embeds.shape[0]).squeeze(-1)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        summed = flat.index_add(0, index, visual_embeds.to(hidden_states.device, hidden_states.dtype))
        return summed.view_as(hidden_states)

    language._deepstack_process = _deepstack_process
    return lambda: language.__dict__.pop("_deepstack_process", None)


def _host_copies_wanted(model, family) -> set[str]:
    """The shipped host copies this model's forward can take in place of its device tensors: image
    sizes always (Pixtral and Mistral 3 read them per image on the host); image and video grids only
    where the tower is wrapped by :mod:`vlm.vision_attention` (which turns a host grid into the
    tower's precomputed inputs on the device; transformers' own tower would build its positions on
    the host and fail)."""
    wanted = {"image_sizes"}
    if any("_vlm_tower_forward" in tower.__dict__ for _, tower in family.component_roots(model, "vision")):
        wanted |= {"image_grid_thw", "video_grid_thw"}
    return wanted


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
        # varlen: the padding mask stays. Given a 2-D mask, transformers' mask creation skips its
        # packed-sequence detection (find_packed_sequence_indices: a host read of the positions),
        # and vlm_varlen's mask builder returns no mask for a packed forward anyway. The block-mask
        # path needs that detection: there the mask goes, and the mask is built from the positions.
        if restore_attention is None:
            kwargs["attention_mask"] = None
        kwargs["use_cache"] = False
        host = shipped.get(HOST_INPUTS) or {}
        for key in wanted_on_host:   # host copies where transformers reads element by element
            if key in host and isinstance(kwargs.get(key), torch.Tensor):
                kwargs[key] = torch.tensor(host[key], dtype=kwargs[key].dtype)
        row = positions.shape[-1]

        @functools.cache
        def bounds():   # only for a batch that came without them: one host read of the positions
            return segment_boundaries(positions)

        if restore_attention is not None:
            if CU_SEQLENS in shipped and MAX_SEQLEN in shipped:
                cu_seqlens = shipped[CU_SEQLENS].to(positions.device, non_blocking=True)
                longest = int(shipped[MAX_SEQLEN])
                if CU_SEQLENS in host:
                    varlen_attention.attach_host_bounds(cu_seqlens, host[CU_SEQLENS])
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

    wanted_on_host = _host_copies_wanted(model, family)
    handles = [mm_model.register_forward_pre_hook(packed_forward, with_kwargs=True)]
    handles.append(mm_model.register_forward_hook(forward_done, with_kwargs=True, always_call=True))
    return PackedForward(handles, restore_attention, varlen_refusal, packed_forward,
                         (placeholder_mask_without_check(mm_model), deepstack_without_read(model, family)))
