"""Compare an exported GGUF pair, run by llama.cpp, with the transformers model it came from.

On one image prompt (the family's chat template, the image at its placeholder): the prompt's token
layout (llama.cpp's tokenizer + mtmd vs transformers' processor), greedy tokens (both with EOS
banned, as ``min_new_tokens`` does, so both run ``n`` steps), and teacher-forced logits along
transformers' greedy tokens: max |Δ logit|, top-1 agreement and mean KL(transformers ‖ llama.cpp).

Where the prompt layouts differ, the difference is reported (``prompt_diff``: the tokens llama.cpp
has that transformers has not) and transformers is then run on llama.cpp's layout, so the logits
compare the weights and the compute, not the tokenizers. Known case: SentencePiece vocabularies
(LLaVA-1.5's Llama 2) — mtmd tokenizes the text after an image as a new segment and llama.cpp
puts the word-start mark ``▁`` before it; transformers does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def probe_image_for(processor, family=None):
    """The probe image at a size both preprocessors leave unresized: the family's ``probe_size``
    where it names one, else the CLIP crop size when the processor crops (LLaVA), else 112 px (a
    multiple of every zoo patch × merge size)."""
    from vlm.export.verify import probe_image

    if family is not None and family.gguf is not None and family.gguf.probe_size:
        width, height = family.gguf.probe_size
        return probe_image(width, height=height)
    crop = getattr(processor.image_processor, "crop_size", None)
    size = crop["height"] if isinstance(crop, dict) and crop.get("height") else 112
    return probe_image(size)


def gguf_prompt_text(prompt: str, family, marker: str) -> str:
    """The chat prompt as llama.cpp takes it: each image placeholder becomes mtmd's media marker,
    with the text the family's processor writes around an image that mtmd does not
    (``GgufSupport.marker_context``)."""
    before, after = family.gguf.marker_context if family.gguf is not None else ("", "")
    return prompt.replace(family.image_placeholder, before + marker + after)


def image_token_ids(config, tokenizer, family) -> tuple[int, int | None]:
    """(image token id, row-break token id or None) of the checkpoint, for ``GgufModel.prompt``."""
    image_token_id = getattr(config, "image_token_id", None) or config.image_token_index
    name = family.gguf.image_break_token if family.gguf is not None else None
    return image_token_id, (tokenizer.convert_tokens_to_ids(name) if name else None)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p = torch.log_softmax(torch.from_numpy(p_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits).double(), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


def _extra_tokens(longer: list[int], shorter: list[int]) -> list[int]:
    """Tokens of ``longer`` left over after matching ``shorter`` in order (a subsequence walk)."""
    import difflib

    sm = difflib.SequenceMatcher(a=shorter, b=longer, autojunk=False)
    extra = []
    for op, a0, a1, b0, b1 in sm.get_opcodes():
        if op != "equal":
            extra += longer[b0:b1] + [-1] * (a1 - a0)   # -1: a transformers token llama.cpp lacks
    return extra


def _with_image_embeddings(model, inputs: dict, features: np.ndarray, image_token_id: int) -> dict:
    """``inputs_embeds``: the token embeddings with ``features`` at the image-token positions."""
    ids = inputs["input_ids"]
    mask = ids[0] == image_token_id
    if int(mask.sum()) != len(features):
        raise ValueError(f"{int(mask.sum())} image tokens in the prompt, {len(features)} image embeddings from "
                         "llama.cpp (a family whose image chunk holds more than image features?)")
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[0, mask] = torch.from_numpy(features).to(embeds.dtype)
    return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}


@torch.no_grad()
def compare_with_transformers(gguf_dir: str | Path, hf_dir: str | Path, *, n_tokens: int = 8,
                              text: str = "Describe the image.", image_features: str = "transformers") -> dict:
    """``image_features="llama.cpp"``: transformers' language model is given llama.cpp's image
    embeddings (``GgufModel.image_embeddings``) in place of its own tower's, so the comparison covers
    the language side alone — for a family whose llama.cpp vision path is known to differ
    (``GgufSupport.runtime_caveat``), the rest of the export is still checked token for token."""
    if image_features not in ("transformers", "llama.cpp"):
        raise ValueError(f"image_features={image_features!r}: 'transformers' or 'llama.cpp'")
    from vlm.export.gguf_runtime import GgufModel
    from vlm.export.verify import probe_messages
    from vlm.load import load

    model, processor = load(str(hf_dir), dtype="fp32", device="cpu")
    family = model.vlm_family
    image = probe_image_for(processor, family)
    prompt = processor.apply_chat_template(probe_messages(text), add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    gg = GgufModel(gguf_dir)
    image_token_id, break_id = image_token_ids(model.config, processor.tokenizer, family)
    gg_text = gguf_prompt_text(prompt, family, gg.marker)
    layout, _ = gg.prompt(gg_text, [image], image_token_id, break_id)
    hf_ids = inputs["input_ids"][0].tolist()
    diff = [] if layout == hf_ids else _extra_tokens(layout, hf_ids)
    if diff:
        inputs = dict(inputs, input_ids=torch.tensor([layout]), attention_mask=torch.ones(1, len(layout), dtype=torch.long))
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = tuple(int(e) for e in eos if e is not None)
    n_prompt = inputs["input_ids"].shape[1]
    if image_features == "llama.cpp":
        inputs = _with_image_embeddings(model, inputs, gg.image_embeddings(image), image_token_id)
        n_prompt = 0   # generate() from embeddings returns the new tokens only
    out = model.generate(**inputs, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    hf_tokens = out.sequences[0, n_prompt:].tolist()
    hf_logits = torch.stack(out.logits, 1)[0].float().numpy()
    del model
    try:
        layout, gg_tokens, _ = gg.greedy(gg_text, [image], image_token_id, n_tokens, banned=eos,
                                         break_token_id=break_id)
        tf = gg.teacher_forced(gg_text, [image], image_token_id, hf_tokens, break_token_id=break_id)
    finally:
        gg.close()
    hf_for_cmp = hf_logits.copy()
    hf_for_cmp[:, list(eos)] = tf[:, list(eos)]   # transformers set banned EOS logits to -inf
    return {
        "prompt_tokens_equal": not diff,
        "prompt_diff": [processor.tokenizer.convert_ids_to_tokens(t) if t >= 0 else "<missing>" for t in diff],
        "prompt_tokens": len(layout),
        "tokens_equal": gg_tokens == hf_tokens,
        "hf_tokens": hf_tokens, "gguf_tokens": gg_tokens,
        "max_abs_logit_diff": float(np.abs(tf - hf_for_cmp).max()),
        "logit_scale": float(np.abs(hf_for_cmp).max()),
        "top1_agreement": float((tf.argmax(-1) == hf_for_cmp.argmax(-1)).mean()),
        "kl_mean": float(_kl(hf_for_cmp, tf).mean()),
    }
