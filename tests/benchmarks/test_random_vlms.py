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


def test_a_partial_build_is_removed_and_the_folder_appears_complete(tmp_path, capsys):
    """A build killed while writing leaves replacing_folder's temporary folder (up to 48 GB at 24B):
    the next build removes it, says so, and the checkpoint folder appears only when complete."""
    name = ONE_PER_ZOO[0]
    partial = tmp_path / f".{name}_random_tiny.k1ll3d"
    partial.mkdir()
    (partial / "model-00001-of-00012.safetensors").write_bytes(b"\0" * 1024)
    path = build(tmp_path, name, tiny=True)
    assert not partial.exists() and "partial random checkpoint" in capsys.readouterr().out
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_build_the_disk_cannot_hold_is_refused_by_name(tmp_path):
    from random_vlms import check_disk

    (tmp_path / "gemma3_12b_random").mkdir()
    with pytest.raises(SystemExit, match=r"mistral_small_3_1_24b_random: .* GB needed .* GB free .*gemma3_12b_random"):
        check_disk(tmp_path / "mistral_small_3_1_24b_random", 10**15)
    check_disk(tmp_path / "tiny", 1000)   # fits: no error
