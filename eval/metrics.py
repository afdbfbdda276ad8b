"""Caption metrics against reference captions, computed by pycocoevalcap (the COCO caption toolkit).

Captions and references are tokenized with pycocoevalcap's PTBTokenizer (Stanford PTB tokenizer,
lower-cased, punctuation removed; runs Java), then scored at corpus level:

- BLEU-n (Papineni et al. 2002): BP · exp(Σ_{k≤n} ¼·log p_k) with modified k-gram precisions p_k
  pooled over the corpus and brevity penalty BP = min(1, exp(1 − r/c)) ("closest" reference length).
  Reported: BLEU-1..4 (uniform weights 1/n over k = 1..n).
- ROUGE-L (Lin 2004): per image F_β from the longest common subsequence against each reference,
  F = (1+β²)·P·R / (R + β²·P), β = 1.2, max over references; averaged over images.
- CIDEr-D (Vedantam et al. 2015): mean over n = 1..4 of the TF-IDF n-gram cosine similarity to each
  reference (length-penalised, Gaussian σ = 6, clipped counts), averaged over references, ×10;
  IDF from the evaluated references themselves.
- METEOR 1.5 (Denkowski & Lavie 2014): unigram-alignment F-mean with fragmentation penalty; needs
  Java (skipped with a notice when ``java`` is missing or ``meteor=False``).

Without Java the PTB tokenizer cannot run either: a simple Python tokenizer stands in (with a
notice), so BLEU/ROUGE-L/CIDEr are still reported but may differ slightly from the toolkit's.
- SPICE (Anderson et al. 2016): scene-graph tuple F1; only when its Stanford CoreNLP jars are
  present beside pycocoevalcap (they are downloaded on first use otherwise: we never download).

All values are in [0, 1] except CIDEr (in [0, 10]). Keys: ``BLEU-1``..``BLEU-4``, ``ROUGE-L``,
``CIDEr``, ``METEOR``, ``SPICE``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Sequence

from vlm.errors import VlmError


class MetricsError(VlmError):
    """The inputs to the caption metrics are unusable."""


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_available() -> bool:
    """SPICE runs only when its CoreNLP jars were already put beside pycocoevalcap's spice jar."""
    try:
        import pycocoevalcap.spice.spice as spice_mod
    except ImportError:
        return False
    lib = Path(spice_mod.__file__).parent / "lib"
    return java_available() and all((lib / f"stanford-corenlp-3.6.0{s}.jar").is_file() for s in ("", "-models"))


# What pycocoevalcap's PTBTokenizer drops after tokenizing.
_PUNCT = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def simple_tokenize(captions: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Java-free stand-in for PTBTokenizer.tokenize: lower-case, split words from punctuation, drop
    the punctuation tokens PTBTokenizer drops. Same input/output shape as PTBTokenizer."""
    out = {}
    for k, caps in captions.items():
        out[k] = []
        for c in caps:
            toks = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]+", c["caption"].lower())
            out[k].append(" ".join(t for t in toks if t not in _PUNCT))
    return out


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} captions but {len(references)} reference lists")
    if not hypotheses:
        raise MetricsError("no captions to score")
    for i, refs in enumerate(references):
        if not refs or not any(r.strip() for r in refs):
            raise MetricsError(f"item {i} has no reference caption: every image needs at least one")


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *,
                    meteor: bool = True, spice: bool | None = None,
                    notices: list[str] | None = None, meteor_scorer=None) -> dict[str, float]:
    """Corpus-level metrics of ``hypotheses[i]`` against ``references[i]`` (a list of strings).

    ``meteor``: compute METEOR when Java is present (False skips it, e.g. in fast tests).
    ``spice``: None = when its CoreNLP jars are present; True = required (error if absent).
    Skipped metrics are left out of the result and explained in ``notices`` (appended to).
    ``meteor_scorer``: a live ``pycocoevalcap`` ``Meteor()`` to reuse (its JVM takes ~30 s to start;
    one scorer can serve every variant). Without it a scorer is started and stopped here.
    """
    _check(hypotheses, references)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    notices = notices if notices is not None else []
    ids = [str(i) for i in range(len(hypotheses))]
    gts_raw = {k: [{"caption": r} for r in refs] for k, refs in zip(ids, references)}
    res_raw = {k: [{"caption": h}] for k, h in zip(ids, hypotheses)}
    java = java_available()
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenize = PTBTokenizer().tokenize
    else:
        tokenize = simple_tokenize
        notices.append("Java is missing: captions were tokenized with a simple Python tokenizer instead "
                       "of the PTB tokenizer (values can differ slightly from the COCO toolkit's); "
                       "METEOR and SPICE skipped. Install a JRE (`java` on PATH) for official values.")
        meteor, spice = False, False
    gts, res = tokenize(gts_raw), tokenize(res_raw)

    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = float(b)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        if meteor_scorer is None:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor_scorer = Meteor()  # a Java subprocess, killed when the scorer is collected
        out["METEOR"] = float(meteor_scorer.compute_score(gts, res)[0])
    elif java:
        notices.append("METEOR skipped (turned off)")
    want_spice = spice_available() if spice is None else spice
    if want_spice:
        if not spice_available():
            raise MetricsError("SPICE needs Stanford CoreNLP 3.6.0 jars in pycocoevalcap/spice/lib "
                               "(run pycocoevalcap's get_stanford_models once, online)")
        from pycocoevalcap.spice.spice import Spice

        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    elif java:
        notices.append("SPICE skipped: its Stanford CoreNLP jars are not installed beside pycocoevalcap "
                       "(run pycocoevalcap.spice.get_stanford_models once, online, to enable it)")
    return out
