"""Bounded memory while streaming, `vlm data` exit codes, length-grouped batching with workers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from vlm.cli.main import main as vlm_main
from vlm.data_formats.collator import VisionChatCollator
from vlm.data_formats.synthetic import generate
from vlm.data_formats.torch_datasets import ConversationDataset, load_training_data
from vlm.train.dataset import SeededSampler

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "data_streaming_rss.py"


def test_streaming_rss_is_bounded(tmp_path):
    """30,000 records (~19 MB of JSONL; parsed they would take ~50 MB): RSS may not grow by more than
    4 MB between record 10,000 and the end."""
    spec = importlib.util.spec_from_file_location("data_streaming_rss", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.write_dataset(tmp_path, 30_000)
    result = bench.measure(path, first_checkpoint=10_000, every=5_000)
    assert result["valid_records"] + result["rejected"] == 30_000 and result["rejected"] == 30
    assert result["rss_growth_mb"] < 4, result


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), n=12, seed=0, image_size=64)


def test_data_check_exit_codes(synthetic, tmp_path, tiny_checkpoint, capsys):
    assert vlm_main(["data", "check", str(synthetic.sharegpt_json), str(synthetic.messages_jsonl)]) == 0
    bad = tmp_path / "bad.jsonl"
    lines = synthetic.messages_jsonl.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["messages"][1]["role"] = "bot"
    bad.write_text("\n".join([lines[0], json.dumps(broken), "{not json"]) + "\n")
    out_json = tmp_path / "report.json"
    rc = vlm_main(["data", "check", str(bad), "--image-root", str(synthetic.root),
                   "--json", str(out_json), "--rejects", str(tmp_path / "rejects.jsonl")])
    text = capsys.readouterr().out
    assert rc == 1
    assert f"{bad}, record 1, id='scene-00001': messages[1] has unknown role 'bot'" in text
    assert "record 2: invalid JSON at line 3" in text
    report = json.loads(out_json.read_text())
    assert report["rejects"]["by_problem"] == {"unknown_role": 1, "invalid_json": 1}
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 2
    assert vlm_main(["data", "check", str(tmp_path / "nope.jsonl")]) == 2
    # with a model: token statistics and max-length effects
    model = str(tiny_checkpoint("qwen2_vl"))
    assert vlm_main(["data", "check", str(synthetic.sharegpt_json), "--model", model,
                     "--max-length", "30"]) == 0
    text = capsys.readouterr().out
    assert "image tokens: min 4" in text and "12 sample(s) would be truncated" in text
    assert vlm_main(["data", "preview", str(synthetic.sharegpt_json), "--model", model, "--index", "3"]) == 0
    text = capsys.readouterr().out
    assert "<image × 4>" in text and f"⟦{synthetic.captions[3]}<|im_end|>⟧" in text


def test_length_grouped_batches_through_dataloader_workers(synthetic, tiny_checkpoint):
    from transformers import AutoProcessor

    from vlm.families import get_family

    convs = load_training_data([{"path": str(synthetic.sharegpt_json), "weight": 1.0},
                                {"path": str(synthetic.messages_jsonl), "weight": 0.5}], seed=1)
    assert len(convs) == 18
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint("qwen2_vl")))
    collator = VisionChatCollator(processor, get_family("qwen2_vl"), pad_to_multiple_of=8)
    lengths = [collator.sample_length(c) for c in convs]
    sampler = SeededSampler(lengths, group_size=4, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(18))
    assert lengths[order[0]] == max(lengths), "the longest batch goes first"
    loader = DataLoader(ConversationDataset(convs, lengths), batch_size=4, sampler=sampler,
                        collate_fn=collator, num_workers=2, multiprocessing_context="fork")
    seen = 0
    for batch in loader:
        assert batch["input_ids"].shape[1] % 8 == 0
        seen += batch["input_ids"].shape[0]
    assert seen == 18
