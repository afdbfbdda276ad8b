"""Random-weight Qwen2-VL checkpoints at the real 2B / 7B shapes, with the zoo's tiny processor.

    from random_qwen2_vl import build; build(Path("/tmp/x"), "2b")   # -> /tmp/x/qwen2_vl_2b_random

No hub access on the device, so the weights are random (bf16, seed 0, built on the GPU) and the
processor is the zoo's tiny Qwen2-VL one: its special-token ids are written into the big config, so
image tokens and the chat template work exactly as with a real checkpoint; only the tokenizer's
vocabulary is small (its ids are a subset of the model's vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2-VL-2B-Instruct / Qwen2-VL-7B-Instruct config.json values (text + vision)
SIZES = {
    "2b": dict(text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
               vision_hidden=1536, tie=True),
    "7b": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
               vision_hidden=3584, tie=False),
}


def build(root: Path, size: str) -> Path:
    """Build (once) and return the folder of a random Qwen2-VL checkpoint at ``size`` shapes."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from quant_memory import qwen2_vl_config
    from vlm.zoo import build_tiny

    from random_vlms import remove_partial_builds, save_checkpoint

    path = Path(root) / f"qwen2_vl_{size}_random"
    if (path / "config.json").is_file():
        return path
    Path(root).mkdir(parents=True, exist_ok=True)
    remove_partial_builds(path)
    tiny = build_tiny("qwen2_vl", Path(root) / "tiny_processor", seed=0)
    tcfg = json.loads((Path(tiny) / "config.json").read_text())
    ids = {k: v for k, v in tcfg.items() if k.endswith("token_id")}
    text_ids = {k: v for k, v in tcfg.get("text_config", {}).items() if k.endswith("token_id")}
    # the 2B / 7B values of quant_memory's config, with the tiny processor's special-token ids
    config = qwen2_vl_config(False, size, text_extra=dict(rms_norm_eps=1e-6, **text_ids), token_ids=ids)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    save_checkpoint(model, AutoProcessor.from_pretrained(tiny), path)   # shard by shard, atomically
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path
