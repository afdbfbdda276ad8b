"""Agreement of a variant with the 16-bit baseline.

- ``exact_match``: fraction of images whose greedy caption equals the baseline's (after stripping
  surrounding whitespace).
- Teacher-forced comparison over the *reference* caption tokens (the first reference of each
  image): both models read the same input, prompt (chat template, image) followed by the reference
  caption, and at every caption position t the next-token distributions p (baseline) and q (variant)
  predicting token t from the prefix < t are compared, in float32:

    ``kl_mean``  = (1/N) Σ_t Σ_v p_t(v) · (log p_t(v) − log q_t(v))      KL(baseline ‖ variant), nats
    ``top1_agreement`` = (1/N) Σ_t [argmax_v p_t(v) = argmax_v q_t(v)]

  N counts caption tokens over all images (a token-weighted mean). Identical weights and inputs give
  KL 0 and top-1 agreement 1 exactly. ``teacher_forced_accuracy`` (per variant, baseline included)
  is the fraction of caption positions where argmax q_t is the reference token itself.

Caption positions: the prompt alone and prompt+reference are both run through the processor; the
caption tokens are those after their longest common token prefix (a BPE merge across the boundary
cannot misplace them).

The baseline's log-probabilities are kept in a :class:`LogprobStore` on disk (one file per batch in a
temporary folder), not in memory: 500 images × 20 tokens × a 152k vocabulary is 6 GB in float32.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from vlm.eval.generation import GenerationSettings, item_chat_text, model_device, processor_inputs


def exact_match_rate(captions: Sequence[str], baseline: Sequence[str]) -> float:
    """Fraction of positions where ``captions[i].strip() == baseline[i].strip()``."""
    if len(captions) != len(baseline):
        raise ValueError(f"{len(captions)} captions vs {len(baseline)} baseline captions")
    if not captions:
        return math.nan
    return sum(a.strip() == b.strip() for a, b in zip(captions, baseline)) / len(captions)


@dataclass
class CaptionLogprobs:
    """Next-token log-probs [T, V] (float32, CPU) at the T reference-caption positions of one image."""

    targets: torch.Tensor     # [T] the reference caption's token ids
    logprobs: torch.Tensor    # [T, V]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def teacher_forced_logprobs(model, processor, items: Sequence, settings: GenerationSettings
                            ) -> Iterator[list[CaptionLogprobs]]:
    """Yield, batch by batch, one :class:`CaptionLogprobs` per item (reference = ``references[0]``)."""
    device = model_device(model)
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "right"   # positions then index the same way in every row
    try:
        for start in range(0, len(items), settings.batch_size):
            batch = items[start:start + settings.batch_size]
            prompts = [item_chat_text(processor, it, settings) for it in batch]
            full = processor_inputs(model, processor, [p + it.references[0] for p, it in zip(prompts, batch)], batch)
            only = processor_inputs(model, processor, prompts, batch)
            logits = model(**full.to(device)).logits
            out = []
            for i in range(len(batch)):
                n_full = int(full["attention_mask"][i].sum())
                n_prompt = int(only["attention_mask"][i].sum())
                ids = full["input_ids"][i, :n_full].tolist()
                b = _common_prefix(ids, only["input_ids"][i, :n_prompt].tolist())
                b = max(b, 1)   # position 0 has no prefix to predict it from
                lp = torch.log_softmax(logits[i, b - 1:n_full - 1].float(), dim=-1).cpu()
                out.append(CaptionLogprobs(torch.tensor(ids[b:n_full]), lp))
            yield out
    finally:
        tok.padding_side = old_side


class LogprobStore:
    """The baseline's per-batch log-probs, spilled to a temporary folder (removed by ``close``)."""

    def __init__(self, root: str | Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="vlm-eval-logprobs-", dir=root))
        self.n = 0

    def add(self, batch: list[CaptionLogprobs]) -> None:
        torch.save([(c.targets, c.logprobs) for c in batch], self.dir / f"{self.n:06d}.pt")
        self.n += 1

    def __iter__(self) -> Iterator[list[CaptionLogprobs]]:
        for i in range(self.n):
            yield [CaptionLogprobs(t, lp) for t, lp in torch.load(self.dir / f"{i:06d}.pt")]

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class AgreementAccumulator:
    """Running sums for kl_mean / top1_agreement / teacher_forced_accuracy (see module docstring)."""

    def __init__(self):
        self.kl_sum = 0.0
        self.top1_same = 0
        self.correct = 0
        self.n = 0

    def add(self, base: CaptionLogprobs | None, var: CaptionLogprobs) -> None:
        if base is not None:
            if not torch.equal(base.targets, var.targets):
                raise RuntimeError("baseline and variant tokenized the reference differently: "
                                   "they must share one processor")
            p_log, q_log = base.logprobs, var.logprobs
            self.kl_sum += float((p_log.exp() * (p_log - q_log)).sum())
            self.top1_same += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        self.correct += int((var.logprobs.argmax(-1) == var.targets).sum())
        self.n += int(var.targets.numel())

    def result(self, with_baseline: bool = True) -> dict[str, float | int]:
        n = self.n or math.nan
        out: dict[str, float | int] = {"teacher_forced_accuracy": self.correct / n, "caption_tokens": self.n}
        if with_baseline:
            out["kl_mean"] = self.kl_sum / n
            out["top1_agreement"] = self.top1_same / n
        return out


def compare_teacher_forced(model, processor, items: Sequence, settings: GenerationSettings,
                           baseline: LogprobStore | None = None, record: LogprobStore | None = None
                           ) -> dict[str, float | int]:
    """Run the teacher-forced pass of ``model``; compare with ``baseline`` when given; save the
    log-probs into ``record`` when given (that is how the baseline's are kept)."""
    acc = AgreementAccumulator()
    base_iter = iter(baseline) if baseline is not None else None
    for batch in teacher_forced_logprobs(model, processor, items, settings):
        base_batch = next(base_iter) if base_iter is not None else [None] * len(batch)
        for b, v in zip(base_batch, batch):
            acc.add(b, v)
        if record is not None:
            record.add(batch)
    return acc.result(with_baseline=baseline is not None)
