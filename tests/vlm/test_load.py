"""`vlm.load` on every tiny model: a real training step through the processor, exact save/reload."""

from __future__ import annotations

import json

import pytest
import torch

import vlm
from vlm.errors import UnsupportedModelError, VlmError
from vlm.zoo import VARIANTS

# Parameters that the real architecture never uses in a forward pass: LLaVA takes CLIP features from
# the second-to-last layer (vision_feature_layer=-2), so the last layer and post-layernorm get no
# gradient (in llava-1.5 too).
UNUSED = {"llava": ("model.vision_tower.encoder.layers.1.", "model.vision_tower.post_layernorm.")}


def _image_token_id(config) -> int:
    return getattr(config, "image_token_id", None) or config.image_token_index


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_backward_and_exact_reload(tiny_checkpoint, chat_batch, tmp_path, variant):
    model, processor = vlm.load(tiny_checkpoint(variant), dtype="float32", device="cpu")
    family = model.vlm_family
    assert next(model.parameters()).dtype == torch.float32
    batch = chat_batch(processor, _image_token_id(model.config))
    assert (batch["input_ids"] == _image_token_id(model.config)).any()

    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss), out.loss
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    unused = UNUSED.get(variant, ())
    no_grad = sorted(n for n, g in grads.items() if (g is None or not g.abs().sum() > 0)
                     and not n.startswith(unused))
    assert no_grad == []
    for component in ("vision", "projector", "language"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items()
                   if family.component_of(n) == component), component
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)

    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    again, _ = vlm.load(tmp_path / "saved", dtype="float32", device="cpu")
    with torch.no_grad():
        logits_again = again(**inputs).logits
    assert torch.equal(logits, logits_again)


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(VlmError, match="does not exist"):
        vlm.load(tmp_path / "nowhere", dtype="float32", device="cpu")
    with pytest.raises(VlmError, match="no config.json"):
        vlm.load(tmp_path, dtype="float32", device="cpu")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedModelError, match="supported model_types: .*qwen2_vl"):
        vlm.load(tmp_path, dtype="float32", device="cpu")


def test_bad_dtype_is_named(tiny_checkpoint):
    with pytest.raises(VlmError, match="'float8'"):
        vlm.load(tiny_checkpoint("qwen2_vl"), dtype="float8", device="cpu")
