"""benchmarks/random_vlms.py: the real-size configs of the new families have the published
parameter counts (built on the meta device), and the builder writes a checkpoint that loads and
trains through vlm (shrunk with tiny=True)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from random_vlms import SIZES, build, config_for  # noqa: E402

# Total parameters of the released checkpoints (model cards / safetensors index), in billions.
PUBLISHED = {"qwen3_vl_8b": 8.77, "gemma3_4b": 4.30, "gemma3_12b": 12.19, "mistral_small_3_1_24b": 24.01}


@pytest.mark.parametrize("name", list(SIZES))
def test_real_size_parameter_counts(name):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config_for(name))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED[name], rel=0.01)


# one size per zoo architecture (the sizes of one family shrink to the same tiny model)
ONE_PER_ZOO = list({spec["zoo"]: name for name, spec in reversed(list(SIZES.items()))}.values())


@pytest.mark.parametrize("name", ONE_PER_ZOO)
def test_tiny_build_loads_and_trains(tmp_path, name):
    from PIL import Image

    import vlm

    chat_image = Image.new("RGB", (64, 48), (200, 30, 30))
    path = build(tmp_path, name, tiny=True)
    model, processor = vlm.load(path, dtype="fp32", device="cpu")
    messages = [{"role": "user", "content": [{"type": "image", "image": chat_image},
                                             {"type": "text", "text": "Describe this image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red square."}]}]
    batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
