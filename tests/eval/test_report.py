"""Report files: atomic writes, the table's shape, JSON without NaN."""

import json
import math

import pytest

from vlm.eval.report import _clean, atomic_write, markdown_table


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = atomic_write(tmp_path / "r.json", "old")
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    from vlm.errors import VlmError

    with pytest.raises(VlmError, match=f"cannot write {path}: disk full"):   # names the file and the cause
        atomic_write(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]   # no temp file left behind


def test_table_rows_and_nan_cleaning():
    results = {"num_items": 2, "baseline": "bf16", "notices": ["METEOR skipped (turned off)"], "variants": [
        {"name": "bf16", "example_caption": "a | b", "memory": {"model_bytes": 3 * 2**20, "peak_bytes": None,
         "peak_kind": "n/a"}, "speed": {"tokens_per_s": 10.0}, "metrics": {"BLEU-4": 0.5, "CIDEr": 1.25},
         "clipscore": None, "agreement": None},
        {"name": "nf4", "example_caption": "a c", "memory": {"model_bytes": 2**20, "peak_bytes": 2**21,
         "peak_kind": "cpu_rss_delta"}, "speed": {"tokens_per_s": 5.0}, "metrics": {"BLEU-4": 0.25},
         "clipscore": 0.7, "agreement": {"exact_match": 0.5, "kl_mean": 0.0123, "top1_agreement": 0.9}}]}
    lines = markdown_table(results).splitlines()
    rows = [ln for ln in lines if ln.startswith("| bf16") or ln.startswith("| nf4")]
    assert len(rows) == 2
    assert all(r.count(" | ") == 4 for r in [ln.replace("\\|", "") for ln in rows])
    assert "model 3.0 MiB" in rows[0] and "baseline" in rows[0] and "CIDEr 1.250" in rows[0]
    assert "exact 0.500, KL 0.0123, top-1 0.900" in rows[1] and "CLIPScore 0.700" in rows[1]
    assert json.loads(json.dumps(_clean({"a": math.nan, "b": [math.inf, 1.0]}))) == {"a": None, "b": [None, 1.0]}
