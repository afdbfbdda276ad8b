"""Fixtures for export/serve tests: a vLLM-servable tiny Qwen2-VL and LoRA adapters made on it.

Why not the zoo model as is: vLLM's CPU attention supports head sizes 32, 64, 80, ... only (vllm
0.32 ``CPUAttentionBackend.get_supported_head_sizes``) and the zoo's tiny Qwen2-VL uses 4 heads of
16. This builds the same model from the zoo's own pieces (tokenizer, processor, chat template) with
2 query heads over 1 KV head of 32 dims, ``mrope_section`` rescaled to sum to 32 / 2 = 16.

The "trained" adapter is real training: LoRA r=8 on every language projection, Adam for a few dozen
steps until the model answers the probe image with ``CAPTION`` — so base and adapter give
different greedy tokens, and a served adapter that were ignored would be caught.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CAPTION = "a bright gradient with noise"


def build_servable_qwen2_vl(out_dir: Path, seed: int = 0) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from vlm.zoo import common
    from vlm.zoo import qwen2_vl as zq

    text = zq.text_config_kwargs()
    text.update(num_attention_heads=2, num_key_value_heads=1)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[4, 6, 6])
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=common.TEXT_HIDDEN, mlp_ratio=2, num_heads=1,
                           in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           hidden_act="quick_gelu"),
        tie_word_embeddings=True, **zq.token_id_kwargs())
    model = common.build_model(Qwen2VLForConditionalGeneration, config, seed)
    processor = zq.build_processor(Qwen2VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    return common.save_checkpoint(out_dir, model, processor, zq.generation_kwargs())


def build_servable(variant: str, out_dir: Path, seed: int = 0) -> Path:
    """The zoo's tiny ``variant`` with its language attention reshaped to heads vLLM's CPU attention
    runs (2 query heads over 1 KV head of 32 dims: the zoo's 16-dim heads are not in
    ``CPU_HEAD_SIZES``), weights drawn again from ``seed``; tokenizer, processor, chat template and
    generation config are the zoo's own. M-RoPE sections are doubled with the head (sum = 32 / 2)."""
    import shutil

    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vlm.checkpoint_layout import save_model
    from vlm.zoo import build_tiny, common

    zoo = build_tiny(variant, out_dir.parent / f"{out_dir.name}-zoo", seed=seed)
    config = AutoConfig.from_pretrained(zoo)
    text = config.text_config
    old_head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 2, 1, 32
    if getattr(text, "query_pre_attn_scalar", None) == old_head:   # Gemma: scores scaled by head_dim^-1/2
        text.query_pre_attn_scalar = 32
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if "mrope_section" in rope:
        text.rope_parameters = dict(rope, mrope_section=[n * 32 // old_head for n in rope["mrope_section"]])
        assert sum(text.rope_parameters["mrope_section"]) == 16, text.rope_parameters
    with common.seeded(seed):
        model = AutoModelForImageTextToText.from_config(config).to(torch.float32).eval()
    save_model(model, out_dir)   # the hub's tensor names, as the zoo writes them
    AutoProcessor.from_pretrained(zoo).save_pretrained(out_dir)
    shutil.copy(zoo / "generation_config.json", out_dir / "generation_config.json")
    return out_dir


def train_adapter(base: Path, out: Path, *, steps: int = 40, targets=("language.attention", "language.mlp"),
                  modules_to_save=None, r: int = 8, seed: int = 0, quant=None) -> Path:
    """LoRA-train ``base`` (optionally quantized: QLoRA) to caption the probe image with CAPTION.

    Saves what the training recipe saves: the PEFT adapter, the processor files and ``vlmtune.json``
    (base, recorded quantization plan, resolution).
    """
    from vlm.data_formats.resolution import save_resolution
    from vlm.export.verify import probe_image, probe_messages
    from vlm.load import load
    from vlm.lora import apply_lora

    torch.manual_seed(seed)
    model, processor = load(base, dtype="fp32", device="cpu", quant=quant)
    recorded_quant = (getattr(model.config, "vlmtune", None) or {}).get("quant") if quant else None
    pm = apply_lora(model, model.vlm_family, r=r, alpha=2 * r, targets=list(targets),
                    modules_to_save=modules_to_save, warn=False)
    prompt = processor.apply_chat_template(probe_messages(), add_generation_prompt=True)
    family = model.vlm_family
    full = processor(text=[prompt + CAPTION + family.end_of_turn], images=[probe_image()], return_tensors="pt")
    n_prompt = processor(text=[prompt], images=[probe_image()], return_tensors="pt")["input_ids"].shape[1]
    labels = full["input_ids"].clone()
    labels[:, :n_prompt] = -100
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for _ in range(steps):
        loss = pm(**full, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "vlmtune.json").write_text(json.dumps({"vlmtune": {
        "base_model": str(base), "family": family.name, "quant": recorded_quant, "max_images_per_prompt": 1}}))
    if family.size_in_pixels:
        ip = processor.image_processor.size
        save_resolution(out, {"min_pixels": ip["shortest_edge"], "max_pixels": ip["longest_edge"]})
    return out


def build_servable_qwen2_5_vl(out_dir: Path, seed: int = 0) -> Path:
    """The zoo's tiny Qwen2.5-VL with the same vLLM-CPU-sized attention as :func:`build_servable_qwen2_vl`.
    Its video positions depend on the frames' timing (``second_per_grid_ts`` × ``tokens_per_second``);
    25 tokens per second (the real model: 2) makes a timing change move them far."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from vlm.zoo import common
    from vlm.zoo import qwen2_vl as zq

    text = zq.text_config_kwargs()
    text.update(num_attention_heads=2, num_key_value_heads=1)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[4, 6, 6])
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1,
                           out_hidden_size=common.TEXT_HIDDEN, in_channels=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], tokens_per_second=25, hidden_act="silu"),
        tie_word_embeddings=True, **zq.token_id_kwargs())
    model = common.build_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    processor = zq.build_processor(Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    return common.save_checkpoint(out_dir, model, processor, zq.generation_kwargs())


@pytest.fixture(scope="session")
def servable_base(tmp_path_factory) -> Path:
    return build_servable_qwen2_vl(tmp_path_factory.mktemp("serve") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def trained_adapter(servable_base, tmp_path_factory) -> Path:
    return train_adapter(servable_base, tmp_path_factory.mktemp("serve") / "adapter")


def hf_greedy(model_dir: Path, adapter: Path | None, n: int) -> list[int]:
    """transformers(+PEFT) greedy tokens for the probe request, EOS banned for n tokens (= vLLM min_tokens)."""
    from vlm.export.verify import probe_inputs
    from vlm.load import load

    model, processor = load(model_dir, dtype="fp32", device="cpu")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    inputs = probe_inputs(processor)
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="session")
def make_adapter(servable_base, tmp_path_factory):
    """Factory: ``make_adapter(targets=..., modules_to_save=..., steps=...)`` -> a fresh adapter folder."""
    root = tmp_path_factory.mktemp("adapters")
    count = iter(range(1000))

    def make(**kw) -> Path:
        kw.setdefault("steps", 2)
        return train_adapter(servable_base, root / f"a{next(count)}", **kw)

    return make


@pytest.fixture(scope="session")
def hf_tokens():
    """``hf_tokens(model_dir, adapter, n)``: transformers(+PEFT) greedy tokens of the probe request."""
    return hf_greedy
