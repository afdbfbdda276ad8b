"""CLIPScore = 2.5 * max(cos(E_img, E_txt), 0) on open_clip ViT-B-32 with random weights (offline)."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.eval.clipscore import CLIPSCORE_W, ClipScoreError, ClipScorer


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    return ClipScorer("ViT-B-32", pretrained=None)


def test_formula_matches_embeddings(scorer):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    caps = ["a red circle", "a blue square", "two green triangles"]
    got = scorer.per_image(images, caps)
    with torch.no_grad():
        ei = scorer.model.encode_image(torch.stack([scorer.preprocess(im) for im in images]))
        et = scorer.model.encode_text(scorer.tokenizer(caps))
    cos = torch.nn.functional.cosine_similarity(ei, et, dim=-1)
    want = (CLIPSCORE_W * cos.clamp(min=0)).tolist()
    assert got == pytest.approx(want, abs=1e-5)
    assert scorer(images, caps) == pytest.approx(sum(want) / 3, abs=1e-5)
    assert all(0.0 <= s <= CLIPSCORE_W for s in got)
    assert "2.5" in scorer.describe()["formula"]


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ClipScoreError, match="could not load CLIP model"):
        ClipScorer("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))
