"""A training forward builds no KV cache, for every family of the zoo (vlm.train.no_kv_cache).

Without it, transformers 5's composite configs kept the language model's ``text_config.use_cache``
on while ``model.config.use_cache`` said False: each training forward filled a DynamicCache, and
under per-layer torch.compile every decoder layer compiled its own graph."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tests.conftest import ZOO_VARIANTS
from vlm.train.no_kv_cache import disable_kv_cache


def _train_forward_cache(model):
    model.train()
    ids = torch.randint(3, 50, (1, 12))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return getattr(out, "past_key_values", None)


@pytest.mark.parametrize("variant", ZOO_VARIANTS)
def test_training_forward_builds_no_cache(tiny_checkpoint, variant):
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(variant), dtype=torch.float32)
    model.config.use_cache = False          # what the trainer did before: not enough where a sub-config rules
    if _train_forward_cache(model) is None:
        pytest.skip(f"{variant}: the top-level flag already reaches the language model")
    changed = disable_kv_cache(model)
    assert changed, "a config kept use_cache on, yet disable_kv_cache changed nothing"
    assert _train_forward_cache(model) is None
    assert disable_kv_cache(model) == []     # idempotent: nothing left on


def test_compiled_full_fine_tuning_compiles_one_graph_per_layer_kind_and_saves_the_checkpoints_setting(tmp_path):
    """`vlm train` (method full, no checkpointing, compiled): one graph for the decoder layers and one
    for the vision blocks (with a cache: one per decoder layer, 5 here; 14 at Qwen2-VL-2B on an
    H200, where the recompile limit left the other layers eager); the saved model's language config
    keeps the checkpoint's use_cache (generation reads it)."""
    import json
    import subprocess
    import sys

    from vlm.data_formats.synthetic import generate

    data = generate(tmp_path / "data", n=8, seed=3)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "vlm", "train", "configs/demo_full.yaml",
                        f"data.train=[{data.sharegpt_json}]", f"output={out}", "training.max_steps=1",
                        "training.save_steps=1", "training.batch_size=2", "training.compile=true"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    compiled = json.loads((out / "summary.json").read_text())["startup_seconds"]["first_step_compile"]
    assert (compiled["frames"], compiled["graphs"]) == (2, 2), compiled
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["text_config"]["use_cache"] is True
