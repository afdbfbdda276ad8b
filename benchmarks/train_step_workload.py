"""Workload W of benchmarks/train_step.py, per model shape: configs, batch shapes, batches, FLOPs.

Models (random bf16 weights, real shapes):
  qwen2_vl_2b / qwen2_vl_7b  batch 8 × 512 tokens: 8 prompt tokens, <|vision_start|>, 256
  qwen2_5_vl_7b              <|image_pad|>, <|vision_end|>, 246 answer tokens; one 448×448 image each
                             (grid 1×32×32 = 1024 patches → 256 merged tokens; Qwen2.5-VL: 16
                             windows of 64 patches per image in 28 of its 32 vision blocks)
  qwen3_vl_8b                the same 8 × 512 tokens around one 512×512 image each (16-px patches:
                             grid 1×32×32 = 1024 patches → 256 merged tokens; DeepStack mergers
                             feed vision blocks 8, 16, 24 into decoder layers 0-2; interleaved M-RoPE)
  llava_1_5_7b               batch 8 × 832 tokens: 8 prompt tokens, 576 <image> tokens, 248 answer
                             tokens; one 336×336 image each (CLIP ViT-L/14: 576 patches + CLS)
Labels on the text tokens only. ``--tiny`` shrinks every model to a CPU-sized one of the same kind.
"""

from __future__ import annotations

MODELS = ("qwen2_vl_2b", "qwen2_vl_7b", "qwen2_5_vl_7b", "qwen3_vl_8b", "llava_1_5_7b")
# what `train_step.py --model M` runs when --variants is not given: the HF baseline and ours (the
# NF4 and Liger baselines b, c on the 2B only: one 8B variant costs a minute of device time)
DEFAULT_VARIANTS = {"qwen2_vl_2b": "a,b,c,d,e"}
QWEN_IMAGE, QWEN_VSTART, QWEN_VEND = 151655, 151652, 151653
LLAVA_IMAGE = 32000
LORA_LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def is_llava(model: str) -> bool:
    return model.startswith("llava")


def default_variants(model: str) -> str:
    return DEFAULT_VARIANTS.get(model, "a,d,e")


def model_config(model: str, tiny: bool):
    if is_llava(model):
        return llava_config(tiny)
    if model.startswith("qwen2_5_vl"):
        return qwen2_5_vl_config(tiny)
    if model.startswith("qwen3_vl"):
        return qwen3_vl_config(tiny)
    from quant_memory import qwen2_vl_config

    return qwen2_vl_config(tiny, model.rsplit("_", 1)[-1])


def llava_config(tiny: bool):
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px, 2-layer GELU projector, Llama-2-7B (vocab 32,064)."""
    from transformers import LlavaConfig

    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001)
    if tiny:
        vision.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      image_size=28, projection_dim=32)
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=(2 if tiny else 24) ** 2)


def qwen2_5_vl_config(tiny: bool):
    """Qwen2.5-VL-7B-Instruct's config.json values: Qwen2-VL-7B's text model; a SwiGLU vision tower
    with 112 px windows and full attention in blocks 7, 15, 23, 31."""
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3, tokens_per_second=2)
    if tiny:   # 56 px windows: the tiny 4×4-patch grid is one window of 16 patches
        text.update(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
        vision.update(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                      window_size=56, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                            video_token_id=151656, vision_start_token_id=QWEN_VSTART,
                            vision_end_token_id=QWEN_VEND, tie_word_embeddings=False)


def qwen3_vl_config(tiny: bool):
    """Qwen3-VL-8B-Instruct's config.json values (benchmarks/random_vlms.py has the same shapes for
    the config runs) with its real special-token ids: a 27-block SigLIP-2-style tower (16-px
    patches, learned position embedding), DeepStack mergers on blocks 8, 16, 24; a Qwen3 decoder
    (q/k RMSNorm, head_dim 128) with interleaved M-RoPE."""
    from random_vlms import SIZES
    from transformers import Qwen3VLConfig

    spec = SIZES["qwen3_vl_8b"]
    text = dict(spec["text"], hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)
    vision = dict(spec["vision"], in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  hidden_act="gelu_pytorch_tanh")
    if tiny:   # the tiny tower's 4×4-patch grid is its whole position table; both blocks DeepStack
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [3, 3, 2],
                                     "mrope_interleaved": True})
        vision.update(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                      num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                         video_token_id=151656, vision_start_token_id=QWEN_VSTART,
                         vision_end_token_id=QWEN_VEND, tie_word_embeddings=False)


def shapes(model: str, tiny: bool) -> dict:
    """batch, seq, prompt tokens, image tokens per sample, vision tokens (patches) per image."""
    if is_llava(model):
        side = 2 if tiny else 24          # patches per side: 28/14 or 336/14
        return dict(batch=2 if tiny else 8, seq=32 if tiny else 832, prompt=4 if tiny else 8,
                    image_tokens=side * side, patches_per_image=side * side + 1, image_px=14 * side)
    grid = (1, 4, 4) if tiny else (1, 32, 32)
    n = grid[0] * grid[1] * grid[2]
    return dict(batch=2 if tiny else 8, seq=32 if tiny else 512, prompt=4 if tiny else 8, grid=grid,
                image_tokens=n // 4, patches_per_image=n)


def label_tokens(model: str, s: dict) -> int:
    return s["seq"] - s["image_tokens"] - (0 if is_llava(model) else 2)


def make_batches(model: str, config, tiny: bool, n: int = 4) -> list[dict]:
    import torch

    s = shapes(model, tiny)
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        rows = []
        for _ in range(s["batch"]):
            answer = label_tokens(model, s) - s["prompt"]
            if is_llava(model):
                parts = [torch.randint(2, 32000, (s["prompt"],), generator=g),
                         torch.full((s["image_tokens"],), LLAVA_IMAGE),
                         torch.randint(2, 32000, (answer,), generator=g)]
            else:
                parts = [torch.randint(0, 151000, (s["prompt"],), generator=g), torch.tensor([QWEN_VSTART]),
                         torch.full((s["image_tokens"],), QWEN_IMAGE), torch.tensor([QWEN_VEND]),
                         torch.randint(0, 151000, (answer,), generator=g)]
            rows.append(torch.cat(parts))
        ids = torch.stack(rows)
        labels = ids.clone()
        if is_llava(model):
            labels[ids == LLAVA_IMAGE] = -100
            px = s["image_px"]
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                        "pixel_values": torch.randn(s["batch"], 3, px, px, generator=g)})
            continue
        labels[(ids == QWEN_IMAGE) | (ids == QWEN_VSTART) | (ids == QWEN_VEND)] = -100
        vc = config.vision_config
        patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        t, h, w = s["grid"]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "mm_token_type_ids": (ids == QWEN_IMAGE).long(),
                    "pixel_values": torch.randn(s["batch"] * t * h * w, patch, generator=g),
                    "image_grid_thw": torch.tensor([[t, h, w]] * s["batch"]), "labels": labels})
    return out


def frozen_16bit_modules(model: str) -> list[str]:
    """What variant (b) keeps out of bitsandbytes NF4: the vision side and lm_head."""
    if is_llava(model):
        return ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    return ["model.visual", "lm_head"]


def count_flops(model: str, config, tiny: bool) -> dict:
    """Matmul weights per component from a meta-device model (no memory), and FLOPs per step.

    Components are the family record's (``family.component_of``). N_vis is per vision token
    (patch): the tower's weights, plus the projector's scaled by how many of its inputs each patch
    is (Qwen2-VL's merger and Qwen3-VL's DeepStack mergers run once per 2×2 patches; LLaVA's
    projector once per patch but not on CLIP's CLS token)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm.families import family_for_config

    family = family_for_config(config)
    with torch.device("meta"):
        m = AutoModelForImageTextToText.from_config(config)
    weights = {"language": 0, "lm_head": 0, "vision": 0, "projector": 0}
    for name, mod in m.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        comp = family.component_of(name)
        if comp in weights:
            weights[comp] += mod.weight.numel()
    lm_layers, lm_head, vis, proj = (weights[c] for c in ("language", "lm_head", "vision", "projector"))
    s = shapes(model, tiny)
    T = s["batch"] * s["seq"]
    P = s["batch"] * s["patches_per_image"]
    n_lm = lm_layers + lm_head
    n_vis = vis + proj * (s["image_tokens"] / s["patches_per_image"] if is_llava(model) else 1 / 4)
    tc, vc = config.text_config, config.vision_config
    width = getattr(vc, "embed_dim", None) or vc.hidden_size
    depth = getattr(vc, "depth", None) or vc.num_hidden_layers
    lm_attn = 4 * s["batch"] * s["seq"] ** 2 * tc.hidden_size * tc.num_hidden_layers / 2   # causal, fwd
    vis_attn = 4 * s["batch"] * s["patches_per_image"] ** 2 * width * depth                # fwd
    flops = 4 * n_lm * T + 2 * n_vis * P
    return {"N_LM": n_lm, "N_LM_layers": lm_layers, "N_lm_head": lm_head, "N_vis_per_patch": n_vis,
            "tokens": T, "patches": P, "model_flops": flops,
            "recompute_lm_flops": 2 * lm_layers * T, "vision_bwd_recompute_flops": 4 * n_vis * P,
            "attention_fwd_flops": {"lm": lm_attn, "vision": vis_attn}}
