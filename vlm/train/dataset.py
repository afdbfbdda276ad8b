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

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from vlm.data_formats.mixing import mix_epoch
from vlm.data_formats.reader import DataSpec, read_conversations
from vlm.data_formats.rejects import RejectLog
from vlm.errors import DataError, VlmError


class ConversationDataset(Dataset):
    """Map-style dataset of Conversation objects with their planned token lengths."""

    def __init__(self, conversations: list, lengths: list[int], seed: int):
        self.conversations = conversations
        self.lengths = lengths
        self.seed = seed

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int):
        return self.conversations[i]

    def sampler_factory(self, group_by_length: bool):
        def make(args) -> Sampler:
            batch = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
            return SeededSampler(self.lengths, batch if group_by_length else 0, self.seed)
        return make


class SeededSampler(Sampler[int]):
    """Shuffle seeded by ``seed + epoch``; optionally grouped by length.

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
    """Read, validate, plan and mix the configured training files."""
    data = cfg.data
    rejects = RejectLog(Path(output_dir) / "rejects.jsonl") if data.on_error == "skip" else None
    per_source, report_sources = [], []
    truncated = 0
    for f in data.train:
        spec = DataSpec.parse({"path": f.path, "weight": f.weight, "image_root": data.image_root})
        if not Path(spec.source).exists():
            raise VlmError(f"data.train: {spec.source} does not exist")
        kept = []
        convs = read_conversations([spec], on_error=data.on_error, rejects=rejects)
        for conv in convs:
            try:
                plan = collator.plan(conv)
            except DataError as e:
                if data.on_error == "raise" and not (e.code == "too_long" and data.overlong == "drop"):
                    raise
                if rejects is None:  # overlong=drop with on_error=raise still reports the drop
                    rejects = RejectLog(Path(output_dir) / "rejects.jsonl")
                rejects.add(e)
                continue
            truncated += plan.truncated
            kept.append((conv, plan.keep))
        per_source.append(kept)
        report_sources.append({"path": str(f.path), "weight": f.weight, "records": len(kept)})
    if rejects is not None:
        rejects.close()
    mixed = mix_epoch(per_source, [f.weight for f in data.train], seed=cfg.training.seed, shuffle=False)
    if not mixed:
        raise VlmError("data.train: no usable training sample" +
                       (f"; {rejects.summary()}" if rejects is not None else ""))
    report = {"sources": report_sources, "samples": len(mixed), "text_truncated": truncated,
              "rejected": rejects.as_dict() if rejects is not None else {"total": 0}}
    if rejects is not None and rejects.total:
        print(f"data: {rejects.summary()}")
    if truncated:
        print(f"data: {truncated} sample(s) longer than max_length={data.max_length} are cut in text "
              "after their last image (overlong: truncate)")
    return ConversationDataset([c for c, _ in mixed], [n for _, n in mixed], cfg.training.seed), report
