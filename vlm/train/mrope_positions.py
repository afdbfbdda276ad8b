"""M-RoPE positions of a packed batch (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), by the model's own rule.

Layout (4, B, L), the one by which these families' text models recognise packed input: row 0 holds
the 1-D text positions (0, 1, … restarting at every sample), rows 1–3 the temporal, height and width
positions of each sample as the model's ``get_rope_index`` gives them for that sample alone (text
tokens advance all three axes by 1; an image or video advances them by its grid's extent).

Two places compute them, with the same function (:func:`packed_mrope_positions`):

- the packing collator, on CPU in the DataLoader workers (:class:`ModelRopeIndex`), so that the
  training step does no rope-index work and reads nothing back from the GPU;
- the packed-forward hook (:mod:`vlm.train.packed_forward`), on the model's device, for a packed
  batch that arrives without them (one built elsewhere).

Why transformers' own code rather than a re-derivation: the rule has version-dependent details
(Qwen2.5-VL's video time axis is ``arange(t) · tokens_per_second · second_per_grid_ts``, which
transformers 5.17 computes with ``int(second_per_grid_ts)`` and 5.19 with the float and a final
``.long()``; Qwen3-VL splits every video into one-frame grids separated by timestamps). Running the
installed transformers' ``get_rope_index`` keeps the CPU result identical to what the model would
compute, on whichever release is installed.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from vlm.data_formats.segments import row_spans


class ModelRopeIndex:
    """``get_rope_index`` of a multimodal model class, run on CPU without the model.

    The method belongs to the class and reads only the model's ``config`` (merge size, tokens per
    second) and other methods of the class. So it runs on an instance created without the class's
    ``__init__`` — no parameters, no buffers — that carries the config. Picklable into DataLoader
    workers (the class by reference, the config by value); each process makes its instance once.
    """

    def __init__(self, model_class: type, config: Any):
        self.model_class, self.config = model_class, config
        self._instance = None

    def __getstate__(self) -> dict:
        return {"model_class": self.model_class, "config": self.config, "_instance": None}

    def __call__(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self._instance is None:
            instance = self.model_class.__new__(self.model_class)
            torch.nn.Module.__init__(instance)   # the bookkeeping every module has; no weights
            instance.config = self.config
            self._instance = instance
        return self._instance.get_rope_index(**kwargs)


def mrope_positions(rope_index: Callable, input_ids: torch.Tensor, text_positions: torch.Tensor, spans,
                    mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                    **video) -> torch.Tensor:
    """(4, B, L): text positions, then the (t, h, w) positions ``rope_index`` (a model's
    ``get_rope_index``) gives each sample (``spans``: (row, start, end),
    :func:`vlm.data_formats.segments.row_spans`). One call over the samples stacked as rows, which
    consumes the image (and ``video``: ``video_grid_thw``, Qwen2.5-VL's ``second_per_grid_ts``)
    grids in token order exactly as the packed rows do."""
    width = max(e - s for _, s, e in spans)
    ids = input_ids.new_zeros((len(spans), width))
    types = mm_token_type_ids.new_zeros((len(spans), width))
    real = torch.zeros((len(spans), width), dtype=torch.long, device=input_ids.device)
    for k, (b, s, e) in enumerate(spans):
        ids[k, :e - s] = input_ids[b, s:e]
        types[k, :e - s] = mm_token_type_ids[b, s:e]
        real[k, :e - s] = 1
    per_sample, _ = rope_index(input_ids=ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw,
                               attention_mask=real, **{k: v for k, v in video.items() if v is not None})
    out = text_positions.new_zeros((4, *input_ids.shape))
    out[0] = text_positions
    for k, (b, s, e) in enumerate(spans):
        out[1:, b, s:e] = per_sample[:, k, :e - s].to(out.dtype)
    return out


def packed_mrope_positions(rope_index: Callable, batch: Mapping[str, Any], bounds: list[int]) -> torch.Tensor:
    """:func:`mrope_positions` of a packed batch (the collator's dict, or a forward's keyword
    arguments) whose samples have the boundaries ``bounds``
    (:func:`vlm.data_formats.segments.segment_boundaries`)."""
    if batch.get("mm_token_type_ids") is None:
        raise ValueError("packed M-RoPE batch without mm_token_type_ids (the collator adds them)")
    positions = batch["position_ids"]
    return mrope_positions(rope_index, batch["input_ids"], positions, row_spans(bounds, positions.shape[-1]),
                           batch["mm_token_type_ids"], batch.get("image_grid_thw"),
                           video_grid_thw=batch.get("video_grid_thw"),
                           second_per_grid_ts=batch.get("second_per_grid_ts"))

