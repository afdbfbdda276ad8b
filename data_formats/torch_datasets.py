"""``torch.utils.data`` views of conversations.

- :class:`ConversationDataset`: map-style, holds parsed conversations (text + image references,
  no pixels) for shuffling and length-grouped batching. Build it with :func:`load_training_data`.
- :class:`StreamingConversations`: iterable-style, re-reads the sources every epoch with bounded
  memory; each DataLoader worker takes every *k*-th record so workers never duplicate samples.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vlm.data_formats.conversation import Conversation
from vlm.data_formats.mixing import interleave, mix_epoch
from vlm.data_formats.reader import DataSpec, iter_conversations
from vlm.data_formats.rejects import RejectLog


class ConversationDataset(Dataset):
    def __init__(self, conversations: Sequence[Conversation], lengths: Sequence[int] | None = None):
        self.conversations = list(conversations)
        self.lengths = list(lengths) if lengths is not None else None

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> Conversation:
        return self.conversations[i]


def load_training_data(data: Any, *, seed: int = 0, on_error: str = "raise",
                       rejects: RejectLog | None = None, image_root: str | None = None,
                       **read_kwargs) -> list[Conversation]:
    """Read every source of ``data`` (a path, a list of paths / ``{"path", "weight"}`` dicts /
    :class:`DataSpec`s) and mix them by weight for one epoch (see :func:`mix_epoch`)."""
    items = data if isinstance(data, (list, tuple)) else [data]
    specs = [DataSpec.parse(item) for item in items]
    per_source = [list(iter_conversations(s.source, image_root=s.image_root or image_root,
                                          on_error=on_error, rejects=rejects, **read_kwargs))
                  for s in specs]
    if len(specs) == 1 and specs[0].weight == 1.0:
        return per_source[0]
    return mix_epoch(per_source, [s.weight for s in specs], seed=seed)


class StreamingConversations(IterableDataset):
    """Stream conversations from weighted sources; one pass = until the first source runs out
    (``stopping="first_exhausted"``) or all were read once (``"all_exhausted"``).

    With ``on_error="skip"`` each worker counts into its own RejectLog copy; the main process's log
    is only complete with ``num_workers=0``, so pass ``rejects_path`` for a per-worker rejects file
    (``<path>.worker<k>``) when using workers.
    """

    def __init__(self, data: Any, *, seed: int = 0, stopping: str = "first_exhausted",
                 on_error: str = "raise", rejects_path: str | None = None, **read_kwargs):
        items = data if isinstance(data, (list, tuple)) else [data]
        self.specs = [DataSpec.parse(item) for item in items]
        self.seed, self.stopping = seed, stopping
        self.on_error, self.rejects_path = on_error, rejects_path
        self.read_kwargs = read_kwargs
        self.epoch = 0
        self.rejects: RejectLog | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Conversation]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        path = self.rejects_path
        if path is not None and workers > 1:
            path = f"{path}.worker{worker}"
        self.rejects = RejectLog(path) if self.on_error == "skip" else None

        def opener(spec: DataSpec):
            return lambda: iter_conversations(spec.source, image_root=spec.image_root,
                                              on_error=self.on_error, rejects=self.rejects,
                                              **self.read_kwargs)

        stream = interleave([opener(s) for s in self.specs], [s.weight for s in self.specs],
                            seed=self.seed + self.epoch, stopping=self.stopping)
        try:
            for k, conv in enumerate(stream):
                if k % workers == worker:
                    yield conv
        finally:
            if self.rejects is not None:
                self.rejects.close()
