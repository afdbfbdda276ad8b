"""The harness end to end on the zoo's tiny Qwen2-VL (CPU, seconds)."""

import json
import math

import pytest
import torch

from vlm.cli.main import main
from vlm.eval.agreement import compare_teacher_forced, teacher_forced_logprobs
from vlm.eval.data import read_eval_items
from vlm.eval.generation import GenerationSettings, generate_captions
from vlm.eval.harness import load_variant

from ._helpers import CAPTIONS, write_eval_file


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return tiny_checkpoint("qwen2_vl")


def test_caption_positions_are_the_reference_tokens(qwen, tmp_path):
    items = read_eval_items(write_eval_file(tmp_path))
    model, processor = load_variant(str(qwen), "bf16", None, "cpu")
    settings = GenerationSettings(max_new_tokens=4, batch_size=2)   # 3 items: a padded last batch
    batches = list(teacher_forced_logprobs(model, processor, items, settings))
    got = [c for b in batches for c in b]
    assert len(got) == len(items)
    for it, c in zip(items, got):
        assert processor.tokenizer.decode(c.targets) == it.references[0]
        assert c.logprobs.shape == (c.targets.numel(), c.logprobs.shape[-1])
        assert torch.allclose(c.logprobs.exp().sum(-1), torch.ones(c.targets.numel()), atol=1e-4)


def test_same_weights_twice_agree_exactly(qwen, tmp_path):
    """Two independent bf16 loads: identical captions, KL exactly 0, top-1 agreement 1."""
    from vlm.eval.agreement import LogprobStore, exact_match_rate

    items = read_eval_items(write_eval_file(tmp_path))
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    store = LogprobStore(tmp_path)
    try:
        m1, p1 = load_variant(str(qwen), "bf16", None, "cpu")
        g1 = generate_captions(m1, p1, items, settings)
        compare_teacher_forced(m1, p1, items, settings, record=store)
        m2, p2 = load_variant(str(qwen), "bf16", None, "cpu")
        g2 = generate_captions(m2, p2, items, settings)
        agree = compare_teacher_forced(m2, p2, items, settings, baseline=store)
    finally:
        store.close()
    assert exact_match_rate(g2.captions, g1.captions) == 1.0
    assert agree["kl_mean"] == 0.0
    assert agree["top1_agreement"] == 1.0
    assert agree["caption_tokens"] > 0
    assert g1.num_tokens == g2.num_tokens and all(1 <= n <= 6 for n in g1.num_tokens)
    assert g1.model_bytes == sum(p.numel() * p.element_size() for p in m1.parameters()) + \
        sum(b.numel() * b.element_size() for b in m1.buffers())


def test_teacher_forced_kl_detects_a_perturbed_model(qwen, tmp_path):
    """The comparison can fail: a freshly drawn (untied) lm_head gives KL > 0 and other argmax tokens.

    (The zoo model ties lm_head to the embeddings, so a random tied head still predicts "copy the
    input token": the new head must be a separate matrix.)"""
    from vlm.eval.agreement import LogprobStore

    items = read_eval_items(write_eval_file(tmp_path))
    settings = GenerationSettings(max_new_tokens=4, batch_size=3)
    store = LogprobStore(tmp_path)
    try:
        m1, p1 = load_variant(str(qwen), "fp32", None, "cpu")
        compare_teacher_forced(m1, p1, items, settings, record=store)
        old = m1.get_output_embeddings()
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        with torch.no_grad():
            new.weight.copy_(torch.randn(new.weight.shape, generator=torch.Generator().manual_seed(1)))
        m1.set_output_embeddings(new)
        agree = compare_teacher_forced(m1, p1, items, settings, baseline=store)
    finally:
        store.close()
    assert agree["kl_mean"] > 1e-4
    assert agree["top1_agreement"] < 1.0


def test_cli_bf16_nf4_dynamic_writes_the_four_files(qwen, tmp_path):
    data = write_eval_file(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(qwen), "--data", str(data), "--compare", "bf16,bf16,nf4,dynamic",
               "--out", str(out), "--max-new-tokens", "5", "--no-meteor", "--device", "cpu"])
    assert rc == 0
    for name in ("results.json", "results.md", "chart.png", "captions.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    by = {v["name"]: v for v in results["variants"]}
    assert list(by) == ["bf16", "bf16#2", "nf4", "dynamic"]
    assert by["bf16#2"]["agreement"] == {"exact_match": 1.0, "kl_mean": 0.0, "top1_agreement": 1.0}
    for name in ("nf4", "dynamic"):
        a = by[name]["agreement"]
        assert 0.0 <= a["exact_match"] <= 1.0 and 0.0 <= a["top1_agreement"] <= 1.0
        assert math.isfinite(a["kl_mean"]) and a["kl_mean"] >= 0.0
        assert by[name]["memory"]["model_bytes"] < by["bf16"]["memory"]["model_bytes"]
    for v in by.values():
        assert set(v["metrics"]) >= {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"}
        assert v["speed"]["tokens_per_s"] > 0
    lines = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * len(CAPTIONS)
    assert {x["variant"] for x in lines} == set(by)
    table = (out / "results.md").read_text()
    assert "| variant | example caption | memory | metrics | agreement |" in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_yaml_config_on_synthetic_scenes(qwen, tmp_path):
    """A YAML config (messages-format synthetic scenes): per-attribute accuracy is reported."""
    import yaml

    from vlm.data_formats.synthetic import generate

    data = generate(tmp_path / "scenes", n=3, seed=1)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(qwen), "data": str(data.messages_jsonl), "compare": "bf16",
                                   "out": str(tmp_path / "out"), "max_new_tokens": 4, "meteor": False,
                                   "scene_vocab": "default", "device": "cpu"}))
    assert main(["eval", "--config", str(cfg), "--batch-size", "2"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["batch_size"] == 2 and results["num_items"] == 3
    (base,) = results["variants"]
    attrs = base["attributes"]
    assert attrs["n"] == 3 and set(attrs["per_attribute"]) == {"shape", "color", "size", "position"}
    lines = (tmp_path / "out" / "captions.jsonl").read_text().splitlines()
    assert [json.loads(x)["references"][0] for x in lines] == data.captions
