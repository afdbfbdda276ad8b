"""``torch.utils.data`` view of conversations.

:class:`ConversationDataset`: map-style, holds parsed conversations (text + image references, no
pixels) for shuffling and length-grouped batching. Build it with :func:`load_training_data`.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import Dataset

from vlm.data_formats.conversation import Conversation
from vlm.data_formats.mixing import mix_epoch
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

