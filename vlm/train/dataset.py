"""The training set: validated conversations with planned lengths, and a seeded sampler.

Every record is read and validated up front (streaming readers: memory holds the parsed
conversations, never decoded pixels), and planned by the collator (tokens and image-token counts
from image headers), so that

- over-long samples are dropped-and-reported (``overlong: drop``) or known to be text-truncated
  before training starts, and bad records are raised or, with ``on_error: skip``, counted and
  written to ``rejects.jsonl`` — never dropped silently;
- the length-grouped sampler knows every sample's length without touching pixels.

The sampler is seeded by ``seed + epoch``, so transformers' resume (which replays the epoch's
sampler and skips the batches already seen) reproduces the data order exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from vlm.data_formats.prepare import prepare_samples
from vlm.data_formats.rejects import RejectLog
from vlm.data_formats.torch_datasets import ConversationDataset, load_training_data
from vlm.errors import VlmError


class SeededSampler(Sampler[int]):
    """Shuffle seeded by ``seed + epoch``; optionally grouped by length.

    A per-index sampler, so Trainer and accelerate can shard it across processes; a plain
    DataLoader takes it as ``sampler=`` with ``batch_size=group_size``.

    With ``group_size > 0`` indices are shuffled, cut into mega-batches of ``50 × group_size``,
    each sorted by length (longest first), so a batch holds samples of similar length (less padding)
    while the order stays random across mega-batches. The longest batch goes first, so an
    out-of-memory error shows at step 1, not hours in.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths = lengths
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        if self.group_size <= 1:
            return iter(order)
        mega = self.group_size * 50
        chunks = [sorted(order[i:i + mega], key=lambda j: -self.lengths[j])
                  for i in range(0, len(order), mega)]
        longest = max(range(len(chunks)), key=lambda c: self.lengths[chunks[c][0]])
        chunks[0], chunks[longest] = chunks[longest], chunks[0]
        return iter([j for c in chunks for j in c])


def prepare_train_set(cfg, collator, output_dir: Path) -> tuple[ConversationDataset, dict[str, Any]]:
    """Read, validate, mix (by weight) and plan the configured training files."""
    data = cfg.data
    for f in data.train:
        if not Path(f.path).exists():
            raise VlmError(f"data.train: {f.path} does not exist")
    # overlong=drop means "drop and report" even when bad records should raise
    skip = data.on_error == "skip" or data.overlong == "drop"
    rejects = RejectLog(Path(output_dir) / "rejects.jsonl") if skip else None
    with rejects if rejects is not None else nullcontext():
        convs = load_training_data([{"path": f.path, "weight": f.weight} for f in data.train],
                                   seed=cfg.training.seed, on_error=data.on_error, rejects=rejects,
                                   image_root=data.image_root)
        prepared = prepare_samples(convs, collator, on_error="skip" if skip else "raise", rejects=rejects)
    if not prepared.conversations:
        raise VlmError("data.train: no usable training sample" +
                       (f"; {rejects.summary()}" if rejects is not None else ""))
    report = {"files": [f.path for f in data.train], **prepared.stats,
              "rejected": rejects.as_dict() if rejects is not None else {"total": 0}}
    if rejects is not None and rejects.total:
        print(f"data: {rejects.summary()}")
    if prepared.truncated:
        print(f"data: {prepared.truncated} sample(s) longer than max_length={data.max_length} are cut "
              "in text after their last image (overlong: truncate)")
    dataset = ConversationDataset(prepared.conversations, prepared.lengths)
    return dataset, report


def sampler_factory(dataset: ConversationDataset, seed: int, group_by_length: bool):
    """For ``VlmTrainer``: builds the seeded sampler once Trainer knows the global batch size."""
    def make(args) -> Sampler:
        batch = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        return SeededSampler(dataset.lengths, batch if group_by_length else 0, seed)
    return make


class GroupedDataset(Dataset):
    """Items are micro-batch rows: lists of conversations planned by a token budget
    (:func:`token_budget_groups`). ``lengths`` are tokens per row, for the seeded sampler."""

    def __init__(self, conversations, groups: list[list[int]], sample_lengths: list[int]):
        self.conversations = conversations
        self.groups = groups
        self.lengths = [sum(sample_lengths[i] for i in g) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> list:
        return [self.conversations[i] for i in self.groups[k]]


@dataclass
class TokenBudget:
    """How the training set is cut into micro-batches by tokens (``data.max_tokens_per_batch``)."""

    dataset: GroupedDataset
    collator: Any               # vlm.data_formats.packing.PackingCollator
    packed: bool
    refusal: str | None         # why a family cannot pack (packing: auto / true), else None
    padding_fraction: float     # share of computed tokens that are padding, over one epoch

    def report(self) -> dict[str, Any]:
        rows = self.dataset.lengths
        return {"max_tokens_per_batch": self.collator.max_tokens, "packed": self.packed,
                "packing_refused": self.refusal, "rows": len(rows),
                "samples_per_row": round(len(self.dataset.conversations) / max(1, len(rows)), 2),
                "tokens_per_row": round(sum(rows) / max(1, len(rows)), 1),
                "padding_fraction": round(self.padding_fraction, 4),
                "length_buckets": self.collator.buckets if self.packed else None}


def token_budget_groups(cfg, train_set: ConversationDataset, collator, family, *, cuda_graphs: bool,
                        mrope_positions=None) -> TokenBudget:
    """Rows of at most ``data.max_tokens_per_batch`` tokens: packed where the family can (and
    ``data.packing`` allows), else length-grouped padded rows. With CUDA graphs every packed row is
    padded to the full budget (one recorded shape); otherwise to ``data.length_buckets`` lengths.
    ``mrope_positions``: the model's M-RoPE rule for packed rows
    (:func:`vlm.train.packed_forward.collator_positions`), computed with each batch on CPU."""
    from vlm.data_formats.packing import (PackingCollator, bucket_length, packing_refusal, plan_packs,
                                          plan_padded_batches)

    data = cfg.data
    budget = data.max_tokens_per_batch
    refusal = packing_refusal(family) if data.packing in ("auto", True) else None
    if data.packing is True and refusal is not None:
        raise VlmError(f"data.packing: true, but {refusal}; use packing: auto (falls back to padded rows)")
    packed = data.packing in ("auto", True) and refusal is None
    lengths = train_set.lengths
    seed = cfg.training.seed
    multiple = data.pad_to_multiple_of or 1
    if packed:
        groups = plan_packs(lengths, budget, seed=seed)
        buckets = 1 if cuda_graphs else data.length_buckets
        multiple = max(multiple, 64 if budget >= 1024 else 8)
        rows = [sum(lengths[i] for i in g) for g in groups]
        computed = sum(bucket_length(n, budget, buckets, multiple) for n in rows)
        collator.pad_to_multiple_of = 1   # the packer pads the row, not each sample
        wrapped = PackingCollator(collator, packed=True, max_tokens=budget, buckets=buckets, multiple=multiple,
                                  mrope_positions=mrope_positions)
    else:
        groups = plan_padded_batches(lengths, budget, seed=seed)
        multiple = collator.pad_to_multiple_of
        computed = sum(len(g) * (-(-max(lengths[i] for i in g) // multiple) * multiple) for g in groups)
        wrapped = PackingCollator(collator, packed=False, max_tokens=budget)
    share = 1 - sum(lengths) / computed if computed else 0.0
    return TokenBudget(GroupedDataset(train_set.conversations, groups, lengths), wrapped, packed, refusal, share)


def resolve_workers(setting, device: str) -> int:
    """``data.num_workers`` resolved: ``auto`` = min(4, cores / 2) when training on a GPU (image decode,
    resize and the processor then run beside the step), 0 on CPU (the workers would take the cores
    the step needs)."""
    import os

    if setting != "auto":
        return int(setting)
    if not str(device).startswith("cuda"):
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))
