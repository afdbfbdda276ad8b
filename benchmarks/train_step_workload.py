"""Workload W of benchmarks/train_step.py: batch shapes, the batches themselves, FLOPs per step."""

from __future__ import annotations

IMAGE, VSTART, VEND = 151655, 151652, 151653          # Qwen2-VL's image / vision start / end ids
LORA_LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shapes(tiny: bool) -> dict:
    if tiny:   # tiny config: grid 1×4×4 = 16 patches → 4 image tokens; 2 samples × 32 tokens
        return dict(batch=2, seq=32, grid=(1, 4, 4), prompt=4)
    return dict(batch=8, seq=512, grid=(1, 32, 32), prompt=8)


def make_batches(config, tiny: bool, n: int = 4) -> list[dict]:
    import torch

    s = shapes(tiny)
    t, h, w = s["grid"]
    n_img = t * h * w // 4
    vc = config.vision_config
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        rows = []
        for _ in range(s["batch"]):
            answer = s["seq"] - s["prompt"] - 2 - n_img
            rows.append(torch.cat([torch.randint(0, 151000, (s["prompt"],), generator=g), torch.tensor([VSTART]),
                                   torch.full((n_img,), IMAGE), torch.tensor([VEND]),
                                   torch.randint(0, 151000, (answer,), generator=g)]))
        ids = torch.stack(rows)
        labels = ids.clone()
        labels[(ids == IMAGE) | (ids == VSTART) | (ids == VEND)] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "mm_token_type_ids": (ids == IMAGE).long(),
                    "pixel_values": torch.randn(s["batch"] * t * h * w, patch, generator=g),
                    "image_grid_thw": torch.tensor([[t, h, w]] * s["batch"]), "labels": labels})
    return out


def count_flops(config, tiny: bool) -> dict:
    """Matmul weights per component from a meta-device model (no memory), and FLOPs per step."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        m = AutoModelForImageTextToText.from_config(config)
    lm_layers = lm_head = vis = merger = 0
    for name, mod in m.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv3d)):
            continue
        n = mod.weight.numel()
        if name == "lm_head":
            lm_head += n
        elif name.startswith("model.language_model"):
            lm_layers += n
        elif name.startswith("model.visual.merger"):
            merger += n
        elif name.startswith("model.visual"):
            vis += n
    s = shapes(tiny)
    T = s["batch"] * s["seq"]
    P = s["batch"] * s["grid"][0] * s["grid"][1] * s["grid"][2]
    n_lm = lm_layers + lm_head
    n_vis = vis + merger / 4
    tc, vc = config.text_config, config.vision_config
    lm_attn = 4 * s["batch"] * s["seq"] ** 2 * tc.hidden_size * tc.num_hidden_layers / 2   # causal, fwd
    vis_attn = 4 * s["batch"] * (P // s["batch"]) ** 2 * vc.embed_dim * vc.depth            # fwd
    model = 4 * n_lm * T + 2 * n_vis * P
    return {"N_LM": n_lm, "N_LM_layers": lm_layers, "N_lm_head": lm_head, "N_vis_per_patch": n_vis,
            "tokens": T, "patches": P, "model_flops": model,
            "recompute_lm_flops": 2 * lm_layers * T, "vision_bwd_recompute_flops": 4 * n_vis * P,
            "attention_fwd_flops": {"lm": lm_attn, "vision": vis_attn}}
