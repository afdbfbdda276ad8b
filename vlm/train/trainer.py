"""``VlmTrainer``: transformers' Trainer plus what VLM fine-tuning needs.

- atomic checkpoints (``vlm.train.checkpoints``),
- tokens counted per step (non-padding tokens) for tokens/s,
- an optional sampler supplied by the data pipeline (length-grouped, seeded: resume-exact),
- loss computed by the model (so fused-CE kernels patched into the model apply).
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from vlm.train.checkpoints import mark_complete


class VlmTrainer(Trainer):
    def __init__(self, *args, train_sampler_factory=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._train_sampler_factory = train_sampler_factory
        self.tokens_seen = 0          # non-padding tokens through forward (this process)
        self.label_tokens_seen = 0    # tokens that carried a loss

    def _get_train_sampler(self, train_dataset=None):
        if self._train_sampler_factory is not None:
            return self._train_sampler_factory(self.args)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.tokens_seen += int(mask.sum())
        labels = inputs.get("labels")
        if labels is not None:
            self.label_tokens_seen += int((labels[:, 1:] != -100).sum())
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            mark_complete(os.path.join(run_dir, f"checkpoint-{self.state.global_step}"),
                          self.state.global_step)

    def peak_memory_bytes(self) -> int:
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
        from vlm.train.metrics import peak_rss_bytes

        return peak_rss_bytes()
