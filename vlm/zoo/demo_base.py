"""The demo's base model: a small Qwen2-VL the project trains itself on its synthetic captions.

The tiny zoo models are random; the demo needs a base that already *sees*: one that captions the
default synthetic scenes ("a large red circle in the top left") well, so that the demo can then
teach it, with LoRA on a 4-bit base, a task it does not know (new words, new caption order).

Shape (real Qwen2-VL module tree, shrunk): text hidden 128, 4 layers, 4 query / 2 KV heads of 32
dims (mrope_section [4, 6, 6] sums to 32 / 2), SwiGLU 352; vision embed 64, depth 4, 4 heads,
patch 14, 2×2 merge. Images are 112×112 → 8×8 patches → 16 image tokens. About 1.2 M parameters,
≈ 4.7 MB of float32 safetensors.

Training: full-parameter AdamW on ``n_train`` synthetic scenes (default vocabulary), batch 32,
cosine schedule; labels on the assistant caption only (the project's collator). Deterministic for a
seed on one CPU thread. Rebuild the shipped copy with::

    vlm zoo demo-base vlm/zoo/assets/demo_base            # 1,500 steps on 4,000 scenes + synonyms

(the shipped copy: that command on one CPU core of the dev machine, 969 s of training; held-out
exact match 1.0 on 200 scenes, recorded in its config.json under ``vlmtune.demo_base``;
``--device cuda`` takes about 4 minutes on an H100).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from vlm.zoo import common
from vlm.zoo import qwen2_vl as q

SHIPPED = Path(__file__).parent / "assets" / "demo_base"
IMAGE_SIZE = 112
TEXT = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=352)
MROPE_SECTION = [4, 6, 6]
VISION = dict(depth=4, embed_dim=64, mlp_ratio=2, num_heads=4, in_channels=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")


def glossary_records() -> list[dict]:
    """Text-only synonym questions: "Another word for blue?" -> "navy".

    A real base model knows many more words than any one captioning task uses; this gives the
    tiny base that property for the words of the demo's task (``vlm.data_formats.scene_vocab.DEMO_VOCAB``), so the
    demo teaches a *task* (caption images in those words, in a new format), not spelling. No record
    here has an image or the demo's caption format. Why it matters for LoRA: with tied embeddings,
    a token the base never emits (" ball", ",") has its embedding pushed down by every softmax, and
    low-rank adapters on the decoder cannot raise it (measured: LoRA plateaued at 3.0 nats/token
    on the demo task without these records, while full fine-tuning fell below 1). The answers
    therefore use each word both first and after a space, and the comma.
    """
    from vlm.data_formats.scene_vocab import ATTRIBUTES, DEFAULT_VOCAB
    from vlm.data_formats.scene_vocab import DEMO_VOCAB

    records = []
    for attr in ATTRIBUTES:
        default = {v if not isinstance(v, (list, tuple)) else tuple(v): w
                   for w, v in DEFAULT_VOCAB.words(attr).items()}
        for word, value in DEMO_VOCAB.words(attr).items():
            key = value if not isinstance(value, (list, tuple)) else tuple(value)
            base_word = default[key]
            pairs = ((f"Another word for {base_word}?", f"{word}, that is {base_word}."),
                     (f"Say {base_word} differently.", f"I would say {word}, or {base_word}."))
            for i, (question, answer) in enumerate(pairs):
                records.append({"id": f"glossary-{attr}-{base_word}-{i}", "conversations": [
                    {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    return records


def build_untrained(out_dir: str | Path, seed: int = 0, *, text: dict | None = None,
                    vision: dict | None = None, mrope_section: list[int] | None = None) -> Path:
    """The demo-base architecture with random weights (the starting point of training).

    ``text`` / ``vision`` / ``mrope_section`` replace the shipped shapes (TEXT, VISION,
    MROPE_SECTION) for a larger base of the same kind (benchmarks/quant_policies.py --train-base)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    shape = dict(TEXT, **(text or {}))
    text = q.text_config_kwargs()
    text.update(shape)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=mrope_section or MROPE_SECTION)
    config = Qwen2VLConfig(text_config=text, vision_config=dict(VISION, **(vision or {}),
                                                                hidden_size=shape["hidden_size"]),
                           tie_word_embeddings=True, **q.token_id_kwargs())
    model = common.build_model(Qwen2VLForConditionalGeneration, config, seed)
    processor = q.build_processor(Qwen2VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    ip = processor.image_processor
    ip.size = {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**q.generation_kwargs())
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def train_base(model_dir: str | Path, *, seed: int = 0, n_train: int = 4000, steps: int = 1500,
               batch_size: int = 32, lr: float = 3e-3, log_every: int = 50,
               device: str = "cpu", glossary_share: float = 0.15, weight_decay: float = 0.05) -> dict:
    """Full-parameter training of the base on default-vocabulary scenes (plus text-only synonym
    questions, ``glossary_share`` of the mix); saves in place."""
    import json
    import tempfile

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm.data_formats.collator import VisionChatCollator
    from vlm.data_formats.reader import read_conversations
    from vlm.data_formats.synthetic import generate
    from vlm.families import get_family

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device)
    processor = AutoProcessor.from_pretrained(model_dir)
    collator = VisionChatCollator(processor, get_family("qwen2_vl"), max_length=128)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(tmp, n=n_train, seed=seed + 1000, image_size=IMAGE_SIZE)
        convs = read_conversations(str(data.sharegpt_json))
        glossary_json = Path(tmp) / "glossary.json"
        glossary_json.write_text(json.dumps(glossary_records()))
        words = read_conversations(str(glossary_json))
        convs += words * max(1, round(glossary_share * len(convs) / len(words)))
        batches_per_epoch = len(convs) // batch_size
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        g = torch.Generator().manual_seed(seed)
        model.train()
        t0, history, order = time.perf_counter(), [], []
        for step in range(steps):
            if not order:
                order = torch.randperm(len(convs), generator=g).tolist()[: batches_per_epoch * batch_size]
            idx, order = order[:batch_size], order[batch_size:]
            batch = {k: v.to(device) for k, v in collator([convs[i] for i in idx]).items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % log_every == 0 or step == steps - 1:
                history.append((step, loss.item()))
                print(f"demo-base step {step:5d}/{steps}  loss {loss.item():.4f}  "
                      f"{time.perf_counter() - t0:6.1f}s", flush=True)
    seconds = round(time.perf_counter() - t0, 1)
    model.eval()
    from vlm.data_formats.scene_vocab import DEFAULT_VOCAB
    from vlm.demo.accuracy import caption_accuracy, heldout_items

    with tempfile.TemporaryDirectory() as tmp:
        items = heldout_items(tmp, DEFAULT_VOCAB, n=200, seed=seed + 9999, image_size=IMAGE_SIZE)
        acc = caption_accuracy(model, processor, items, DEFAULT_VOCAB, batch_size=50)
    print(f"demo-base held-out accuracy: exact {acc['exact_match']:.3f}, per attribute "
          f"{acc['per_attribute']}", flush=True)
    model.to("cpu").save_pretrained(model_dir)
    return {"steps": steps, "n_train": n_train, "loss_history": history, "seconds": seconds,
            "heldout": {k: acc[k] for k in ("n", "exact_match", "all_attributes", "per_attribute")}}


def build_demo_base(out_dir: str | Path, seed: int = 0, **train_kwargs) -> Path:
    """Build + train the demo base into ``out_dir`` (written to a temp folder, then renamed)."""
    import json
    import os
    import shutil
    import tempfile

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_untrained(tmp, seed=seed)
        report = train_base(tmp, seed=seed, **train_kwargs)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["vlmtune"] = {"demo_base": {"seed": seed, **{k: v for k, v in report.items()
                                                           if k != "loss_history"},
                                        "final_loss": report["loss_history"][-1][1]}}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
