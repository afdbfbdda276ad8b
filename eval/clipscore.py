"""CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning").

    CLIPScore(image, caption) = w · max(cos(E_img, E_txt), 0),   w = 2.5

E_img / E_txt are the CLIP image and text embeddings (open_clip); the reported value is the mean
over images. With w = 2.5 the paper's ViT-B/32 scores fall roughly in [0, 1]. Captions longer than
CLIP's 77-token context are truncated by the open_clip tokenizer. Values depend on the CLIP weights,
so ``results.json`` records the model name and weights used.

Weights come only from what the user names: a local checkpoint file, an open_clip pretrained tag
(e.g. ``openai``, resolved from open_clip's cache/hub), or ``hf-hub:org/name``. Without weights the
metric is skipped with a notice (random weights give meaningless numbers).
"""

from __future__ import annotations

from typing import Sequence

import torch

from vlm.errors import VlmError

CLIPSCORE_W = 2.5


class ClipScoreError(VlmError):
    """The CLIP model for CLIPScore could not be loaded."""


class ClipScorer:
    """``ClipScorer("ViT-B-32", "/path/open_clip_model.safetensors")(images, captions) -> float``.

    ``pretrained=None`` builds random weights: only for tests of the formula.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32):
        import open_clip

        try:
            # an hf-hub: name carries its own weights; a pretrained tag is not allowed with it
            weights = None if model_name.startswith("hf-hub:") else pretrained
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights,
                                                                         device=device)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as e:  # open_clip raises RuntimeError/OSError/HF errors for bad names/paths
            raise ClipScoreError(f"could not load CLIP model {model_name!r} with weights {pretrained!r}: {e}. "
                                 "Give --clip-weights a local open_clip checkpoint file, an open_clip "
                                 "pretrained tag available offline, or --clip-model hf-hub:org/name") from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model_name, self.pretrained = model_name, pretrained

    @torch.inference_mode()
    def per_image(self, images: Sequence, captions: Sequence[str]) -> list[float]:
        """w · max(cos(E_img, E_txt), 0) for each (image, caption) pair."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images vs {len(captions)} captions")
        scores: list[float] = []
        for s in range(0, len(images), self.batch_size):
            imgs = torch.stack([self.preprocess(im) for im in images[s:s + self.batch_size]]).to(self.device)
            toks = self.tokenizer(list(captions[s:s + self.batch_size])).to(self.device)
            e_img = torch.nn.functional.normalize(self.model.encode_image(imgs).float(), dim=-1)
            e_txt = torch.nn.functional.normalize(self.model.encode_text(toks).float(), dim=-1)
            cos = (e_img * e_txt).sum(-1)
            scores.extend((CLIPSCORE_W * cos.clamp(min=0)).tolist())
        return scores

    def __call__(self, images: Sequence, captions: Sequence[str]) -> float:
        s = self.per_image(images, captions)
        return sum(s) / len(s) if s else float("nan")

    def describe(self) -> dict:
        return {"model": self.model_name, "weights": self.pretrained,
                "formula": f"CLIPScore = {CLIPSCORE_W} * max(cos(E_img, E_txt), 0), mean over images "
                           "(Hessel et al. 2021)"}
