"""Caption metrics equal pycocoevalcap's own on a fixed toy set; hand-checkable cases."""

import math

import pytest

from vlm.eval.metrics import MetricsError, caption_metrics, simple_tokenize

HYPS = ["A man is riding a horse on the beach.", "a plate with food", "two dogs play in the snow",
        "a red bus parked on the street"]
REFS = [["A man rides a horse along the beach.", "a person riding a brown horse near the ocean"],
        ["a plate of food with broccoli and rice", "a dish of vegetables and meat"],
        ["two dogs playing in snow", "a pair of dogs running through the snow"],
        ["a red double decker bus on a city street"]]


def _coco(hyps, refs, with_meteor=False, meteor=None):
    """The toolkit called directly, the way the COCO caption evaluation does."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    bleu, _ = Bleu(4).compute_score(gts, res)
    out = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if with_meteor:
        out["METEOR"] = meteor.compute_score(gts, res)[0]
    return out


def test_metrics_equal_pycocoevalcap_on_toy_set():
    notices = []
    ours = caption_metrics(HYPS, REFS, meteor=False, notices=notices)
    theirs = _coco(HYPS, REFS)
    assert set(theirs) <= set(ours)
    for k, v in theirs.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1      # a toy set that is neither perfect nor empty
    assert any("METEOR skipped" in n for n in notices)
    assert "METEOR" not in ours


def test_identical_captions_score_perfectly():
    caps = ["a cat sleeping on a red sofa", "three birds sitting on a wire"]
    m = caption_metrics(caps, [[c] for c in caps], meteor=False)
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert m[k] == pytest.approx(1.0, abs=1e-6), k


def test_bleu1_by_hand_brevity_penalty():
    # hypothesis = the reference minus its last word: every unigram matches (p1 = 1), c = 4, r = 5,
    # BP = exp(1 - r/c) = exp(-0.25)
    m = caption_metrics(["a b c d"], [["a b c d e"]], meteor=False)
    assert m["BLEU-1"] == pytest.approx(math.exp(-0.25), rel=1e-6)
    # ROUGE-L: LCS 4, P = 1, R = 4/5, F = (1+b^2) P R / (R + b^2 P) with b = 1.2
    b2 = 1.2 ** 2
    assert m["ROUGE-L"] == pytest.approx((1 + b2) * 0.8 / (0.8 + b2), rel=1e-6)


def test_missing_reference_is_an_error():
    with pytest.raises(MetricsError, match="no reference"):
        caption_metrics(["a cat"], [[]], meteor=False)
    with pytest.raises(MetricsError, match="reference lists"):
        caption_metrics(["a cat", "a dog"], [["a cat"]], meteor=False)


def test_simple_tokenizer_matches_ptb_on_plain_text():
    caps = {"0": [{"caption": "A man, riding a horse."}]}
    assert simple_tokenize(caps) == {"0": ["a man riding a horse"]}


@pytest.mark.slow
def test_meteor_equals_pycocoevalcap():
    """One METEOR run (its JVM takes ~30 s): one scorer serves both computations."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    ours = caption_metrics(HYPS, REFS, meteor_scorer=scorer)
    theirs = _coco(HYPS, REFS, with_meteor=True, meteor=scorer)
    assert ours["METEOR"] == pytest.approx(theirs["METEOR"], abs=1e-12)
    assert 0 < ours["METEOR"] < 1
