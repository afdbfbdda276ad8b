"""Dataset readers, validation, chat rendering, image-token collation (installed as ``vlm.data_formats``).

Read -> validate -> :class:`Conversation` -> :class:`VisionChatCollator` batches::

    from vlm.data_formats import (RejectLog, VisionChatCollator, load_training_data,
                                  prepare_samples, LengthGroupedSampler, ConversationDataset)
    with RejectLog("out/rejects.jsonl") as rejects:
        convs = load_training_data(["a.json", {"path": "b.jsonl", "weight": 0.5}],
                                   on_error="skip", rejects=rejects)
        collator = VisionChatCollator.for_model(model, processor, max_length=2048,
                                                resolution={"max_pixels": 512 * 28 * 28})
        prepared = prepare_samples(convs, collator, on_error="skip", rejects=rejects)
    print(rejects.summary())
    sampler = LengthGroupedSampler(prepared.lengths, batch_size=8)
    loader = DataLoader(ConversationDataset(prepared.conversations, prepared.lengths),
                        batch_sampler=sampler, collate_fn=collator, num_workers=2)
"""

from vlm.data_formats.caption_attributes import caption_scores, parse_caption
from vlm.data_formats.collator import IGNORE_INDEX, SamplePlan, VisionChatCollator
from vlm.data_formats.conversation import Conversation, ImageRef, ImageSlot, Turn
from vlm.data_formats.prepare import PreparedSamples, prepare_samples
from vlm.data_formats.reader import DataSpec, iter_conversations, read_conversations
from vlm.data_formats.rejects import RejectLog
from vlm.data_formats.resolution import Resolution, apply_resolution, load_resolution, save_resolution
from vlm.data_formats.sampler import LengthGroupedSampler
from vlm.data_formats.torch_datasets import ConversationDataset, StreamingConversations, load_training_data

__all__ = [
    "Conversation", "ConversationDataset", "DataSpec", "IGNORE_INDEX", "ImageRef", "ImageSlot",
    "LengthGroupedSampler", "PreparedSamples", "RejectLog", "Resolution", "SamplePlan",
    "StreamingConversations", "Turn", "VisionChatCollator", "apply_resolution", "caption_scores",
    "iter_conversations", "load_resolution", "load_training_data", "parse_caption", "prepare_samples",
    "read_conversations", "save_resolution",
]
