"""Dataset readers, validation, chat rendering, image-token collation (installed as ``vlm.data_formats``).

Read -> validate -> :class:`Conversation` -> :class:`VisionChatCollator` batches::

    from vlm.data_formats import (RejectLog, VisionChatCollator, load_training_data,
                                  prepare_samples, ConversationDataset)
    from vlm.train.dataset import SeededSampler
    with RejectLog("out/rejects.jsonl") as rejects:
        convs = load_training_data(["a.json", {"path": "b.jsonl", "weight": 0.5}],
                                   on_error="skip", rejects=rejects)
        collator = VisionChatCollator.for_model(model, processor, max_length=2048,
                                                resolution={"max_pixels": 512 * 28 * 28})
        prepared = prepare_samples(convs, collator, on_error="skip", rejects=rejects)
    print(rejects.summary())
    sampler = SeededSampler(prepared.lengths, group_size=8, seed=0)   # length-grouped, seeded
    loader = DataLoader(ConversationDataset(prepared.conversations, prepared.lengths), batch_size=8,
                        sampler=sampler, collate_fn=collator, num_workers=2)
"""

import importlib

# name -> submodule; imported on first use so that reading data does not import torch.
_EXPORTS = {
    "caption_scores": "caption_attributes", "parse_caption": "caption_attributes",
    "IGNORE_INDEX": "collator", "SamplePlan": "collator", "VisionChatCollator": "collator",
    "Conversation": "conversation", "ImageRef": "conversation", "ImageSlot": "conversation",
    "Turn": "conversation", "VideoSlot": "conversation", "PreparedSamples": "prepare", "prepare_samples": "prepare",
    "DataSpec": "reader", "iter_conversations": "reader", "read_conversations": "reader",
    "RejectLog": "rejects", "Resolution": "resolution", "apply_resolution": "resolution",
    "load_resolution": "resolution", "save_resolution": "resolution",
    "ConversationDataset": "torch_datasets", "load_training_data": "torch_datasets",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlm.data_formats.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlm.data_formats' has no attribute {name!r}")


__all__ = [
    "Conversation", "ConversationDataset", "DataSpec", "IGNORE_INDEX", "ImageRef", "ImageSlot",
    "PreparedSamples", "RejectLog", "Resolution", "SamplePlan", "Turn", "VisionChatCollator", "apply_resolution", "caption_scores",
    "iter_conversations", "load_resolution", "load_training_data", "parse_caption", "prepare_samples",
    "read_conversations", "save_resolution",
]
