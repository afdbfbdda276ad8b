"""The baseline row of benchmarks/train_e2e.py: transformers ``Trainer`` (+ PEFT LoRA), as their docs set it up.

    python benchmarks/train_e2e_hf.py SPEC.json      (written by train_e2e.py; one process per row)

What the docs recommend and this does: ``from_pretrained`` in bf16 (QLoRA: ``BitsAndBytesConfig``
NF4 with double quantization, vision tower and lm_head kept 16-bit, then PEFT's
``prepare_model_for_kbit_training``), ``LoraConfig`` on the language q/k/v/o/gate/up/down
projections, ``TrainingArguments`` with gradient checkpointing (non-reentrant), bf16 mixed
precision, per-batch dynamic padding (pad to the longest sample of the batch, multiple of 8), a
sample-count batch. The samples and labels are the ones ``vlm train`` trains on (read and labelled
by the project's collator with the same pixel limits and max_length), so both rows learn the same
thing from the same tokens; only batching and the training step differ.

``method: full`` in the spec (the ``2b_full`` model of train_e2e.py): no PEFT; Trainer's mixed
precision as its docs describe it, ``bf16=True`` on fp32 weights (an fp32 master for every weight,
bf16 autocast), the same trained parameters as ``vlm train``'s ``method: full`` (language model,
embeddings, lm_head, projector; the vision tower frozen unless ``train_vision``), gradient
checkpointing (non-reentrant) and Trainer's default optimizer (``adamw_torch_fused``).

Measured like ``vlm train`` measures itself (the same clock, the same summary keys): non-padding
and computed tokens, a CUDA-synchronized clock per optimizer step, time blocked on the DataLoader,
process start -> first optimizer step, peak memory, the loss per step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_path: str) -> int:
    import psutil
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForImageTextToText, AutoProcessor, Trainer, TrainerCallback,
                              TrainingArguments)

    from vlm.data_formats.collator import VisionChatCollator
    from vlm.data_formats.prepare import prepare_samples
    from vlm.data_formats.resolution import Resolution
    from vlm.data_formats.torch_datasets import ConversationDataset, load_training_data
    from vlm.families import family_for_config

    spec = json.loads(Path(spec_path).read_text())
    process_start = time.perf_counter() - (time.time() - psutil.Process().create_time())
    t_start = time.perf_counter()
    device = spec["device"]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    full = spec.get("method", "lora") == "full"
    kw = {}
    if spec["qlora"]:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["model.visual", "lm_head"])
    # full fine-tuning under Trainer's mixed precision: the weights (the optimizer's master) in fp32
    model = AutoModelForImageTextToText.from_pretrained(spec["model"], dtype=torch.float32 if full else dtype,
                                                        device_map=device, **kw)
    processor = AutoProcessor.from_pretrained(spec["model"])
    t_loaded = time.perf_counter()

    family = family_for_config(model.config)
    collator = VisionChatCollator(processor, family, max_length=spec["max_length"], pad_to_multiple_of=8,
                                  resolution=Resolution(min_pixels=spec["min_pixels"], max_pixels=spec["max_pixels"]))
    prepared = prepare_samples(load_training_data(spec["data"]), collator)
    dataset = ConversationDataset(prepared.conversations, prepared.lengths)
    t_data = time.perf_counter()

    if spec["qlora"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if full:
        trained = set(spec["trained_components"])
        for name, p in model.named_parameters():
            p.requires_grad_(family.component_of(name.rsplit(".", 1)[0]) in trained)
    else:
        leaves = "|".join(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                                 target_modules=rf"model\.language_model\..*\.({leaves})",
                                                 task_type="CAUSAL_LM"))
    t_ready = time.perf_counter()

    clock = {"tokens": 0, "computed": 0, "t0": None, "wait": 0.0, "first": None, "steps": []}

    class MeasuredTrainer(Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            if clock["t0"] is None:
                clock["t0"] = time.perf_counter()
            clock["tokens"] += int(inputs["attention_mask"].sum())
            clock["computed"] += inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, **kwargs)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            return super().get_batch_samples(_Timed(epoch_iterator), num_batches, device)

    class _Timed:
        def __init__(self, it):
            self.it = it

        def __iter__(self):
            return self

        def __next__(self):
            t = time.perf_counter()
            try:
                return next(self.it)
            finally:
                clock["wait"] += time.perf_counter() - t

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            clock["first"] = clock["first"] or now
            clock["steps"].append((state.global_step, round(now - clock["t0"], 4), clock["tokens"],
                                   round(clock["wait"], 4)))

    on_gpu = device.startswith("cuda")
    args = TrainingArguments(
        output_dir=spec["output"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"], learning_rate=spec["lr"], lr_scheduler_type="cosine",
        warmup_steps=spec["warmup_ratio"], max_steps=spec["steps"], optim=spec["optim"], seed=spec["seed"],
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=spec["dtype"] == "bf16" and on_gpu, max_grad_norm=spec.get("max_grad_norm", 1.0),
        weight_decay=spec.get("weight_decay", 0.0), logging_steps=1, save_strategy="no", report_to="none",
        remove_unused_columns=False, dataloader_num_workers=spec["workers"],
        dataloader_persistent_workers=spec["workers"] > 0, use_cpu=not on_gpu, disable_tqdm=True)
    trainer = MeasuredTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                              callbacks=[StepClock()])
    out = trainer.train()
    history = trainer.state.log_history
    peak = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else \
        int(psutil.Process().memory_info().rss)
    summary = {
        "tokens": clock["tokens"], "computed_tokens": clock["computed"],
        "padding_fraction": round(1 - clock["tokens"] / clock["computed"], 4) if clock["computed"] else None,
        "step_times": clock["steps"], "data_wait_seconds": round(clock["wait"], 3),
        "startup_seconds": {"imports_s": round(t_start - process_start, 2), "load_s": round(t_loaded - t_start, 2),
                            "data_s": round(t_data - t_loaded, 2), "lora_and_fast_path_s": round(t_ready - t_data, 2),
                            "first_step_s": round(clock["first"] - t_ready, 2),
                            "to_first_step_s": round(clock["first"] - process_start, 2)},
        "peak_memory_bytes": peak, "steps": trainer.state.global_step, "train_loss": out.training_loss,
        "loss_history": [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h],
        "samples": len(dataset), "dataloader_workers": spec["workers"],
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    Path(spec["output"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["output"]) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
