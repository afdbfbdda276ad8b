"""The ``gguf:QUANT`` eval variant (``--compare bf16,nf4,gguf:q4_k_m``): the model (+ adapter,
merged) exported with ``vlm export --gguf`` and run by llama.cpp, scored like every other variant.

Captions: greedy decoding in llama.cpp (EOS ends a caption once ``min_new_tokens`` are out).
Teacher-forced pass: the reference caption is tokenized by the same processor as the baseline's
pass (so targets are equal by construction), fed after llama.cpp's own prompt, and the log-probs go
through the same accumulator (KL to bf16, top-1 agreement, teacher-forced accuracy). A prompt that
llama.cpp lays out differently from transformers is an error, not a silent mismatch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from vlm.data_formats.chat_render import adds_bos
from vlm.eval.agreement import AgreementAccumulator, CaptionLogprobs, LogprobStore, _common_prefix
from vlm.eval.generation import GenerationResult, GenerationSettings, chat_text, prompt_for

PREFIX = "gguf"


def is_gguf(spec: str) -> bool:
    return spec == PREFIX or spec.startswith(PREFIX + ":")


def run_gguf_variant(spec: str, model_path: str, adapter: str | None, items, settings: GenerationSettings,
                     baseline: LogprobStore | None) -> tuple[GenerationResult, dict]:
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    from vlm.export.gguf import export_gguf
    from vlm.export.gguf_runtime import GgufModel
    from vlm.export.gguf_verify import gguf_prompt_text, image_token_ids
    from vlm.families.registry import family_for_config

    quant = spec.partition(":")[2] or "f16"
    processor = AutoProcessor.from_pretrained(model_path)
    config = AutoConfig.from_pretrained(model_path)
    family = family_for_config(config)
    image_token_id, break_id = image_token_ids(config, processor.tokenizer, family)
    eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    tok = processor.tokenizer
    with tempfile.TemporaryDirectory(prefix="vlm-eval-gguf-") as tmp:
        out = export_gguf(adapter or model_path, Path(tmp) / "gguf", quant=quant,
                          base=model_path if adapter else None)
        size = sum(p.stat().st_size for p in out.glob("*.gguf"))
        gg = GgufModel(out)
        try:
            captions, counts, t0 = [], [], time.perf_counter()
            for it in items:
                text = gguf_prompt_text(chat_text(processor, prompt_for(it, settings)), family, gg.marker)
                _layout, logits = gg.prompt(text, [it.image], image_token_id, break_id)
                ids: list[int] = []
                while len(ids) < settings.max_new_tokens:
                    masked = logits.copy()
                    if len(ids) < settings.min_new_tokens:
                        masked[list(eos)] = -float("inf")
                    nxt = int(masked.argmax())
                    if nxt in eos:
                        break
                    ids.append(nxt)
                    logits = gg.step(nxt)
                captions.append(tok.decode(ids, skip_special_tokens=True).strip())
                counts.append(len(ids))
            seconds = time.perf_counter() - t0
            acc = AgreementAccumulator()
            base_rows = [c for batch in baseline for c in batch] if baseline is not None else [None] * len(items)
            for it, base in zip(items, base_rows):
                prompt = chat_text(processor, prompt_for(it, settings))
                special = adds_bos(processor.tokenizer, prompt)   # one BOS, as in training
                full = processor(text=[prompt + it.references[0]], images=[it.image], return_tensors="pt",
                                 add_special_tokens=special)
                only = processor(text=[prompt], images=[it.image], return_tensors="pt", add_special_tokens=special)
                full_ids, prompt_ids = full["input_ids"][0].tolist(), only["input_ids"][0].tolist()
                b = max(_common_prefix(full_ids, prompt_ids), 1)
                layout, _ = gg.prompt(gguf_prompt_text(prompt, family, gg.marker), [it.image], image_token_id,
                                      break_id)
                if layout[:b] != full_ids[:b] or len(layout) != len(prompt_ids):
                    raise RuntimeError(f"{spec}: llama.cpp laid out the prompt of item {it!r:.60} differently "
                                       "from transformers' processor")
                targets = full_ids[b:]
                rows = gg.teacher_forced(gguf_prompt_text(prompt, family, gg.marker), [it.image],
                                         image_token_id, targets, break_id) if b == len(prompt_ids) else None
                if rows is None:
                    raise RuntimeError(f"{spec}: the reference caption merges with the prompt's last token")
                lp = torch.log_softmax(torch.from_numpy(rows).float(), -1)
                acc.add(base, CaptionLogprobs(torch.tensor(targets), lp))
        finally:
            gg.close()
    gen = GenerationResult(captions, counts, seconds, size, None, "n/a", extra={"gguf_quant": quant})
    return gen, acc.result(with_baseline=baseline is not None)
