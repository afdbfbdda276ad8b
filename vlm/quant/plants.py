"""Planted activation outliers: known-bad layers for checking a sensitivity analysis.

The classic case where activation outliers meet small weights: the input channels j of a linear get
1000× larger activations (the rows j of the layer that produces them × 1000) while the planted
linear's columns j shrink 100×. The model's function is unchanged up to rounding (the product of
the two scales is 10, which the planted channels carry into the output), ‖W‖ barely changes (the
weight error stays ordinary), but NF4 rounds those small columns to ~0 relative to their block's
absmax, and they now carry most of the output.

Sites (Qwen2-VL module tree; layer indices chosen so tiny models have them):
    language_mlp        decoder layer 1's down_proj, fed by up_proj through SwiGLU's product
    language_attention  decoder layer 0's o_proj, fed by v_proj through attention (grouped KV)
    vision_attention    vision block 1's attention proj, fed by the v third of the fused qkv
"""

from __future__ import annotations

import torch

SITES = ("language_mlp", "language_attention", "vision_attention")
CHANNELS = (1, 5, 9, 13)


def plant_outliers(model, site: str) -> str:
    """Plant outliers at ``site`` in ``model`` (in place); returns the planted layer's name."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        if site == "language_mlp":
            mlp = "model.language_model.layers.1.mlp"
            for j in (5, 40, 77, 100):
                mods[f"{mlp}.up_proj"].weight[j] *= 1000.0
                mods[f"{mlp}.down_proj"].weight[:, j] /= 100.0
            return f"{mlp}.down_proj"
        if site == "language_attention":
            text = model.config.text_config
            attn = "model.language_model.layers.0.self_attn"
            head_dim = text.hidden_size // text.num_attention_heads
            per_kv = text.num_attention_heads // text.num_key_value_heads
            v, o = mods[f"{attn}.v_proj"], mods[f"{attn}.o_proj"]
            for d in CHANNELS:                      # kv head 0, dim d feeds query heads 0..per_kv-1
                v.weight[d] *= 1000.0
                if v.bias is not None:
                    v.bias[d] *= 1000.0
                for h in range(per_kv):
                    o.weight[:, h * head_dim + d] /= 100.0
            return f"{attn}.o_proj"
        if site == "vision_attention":
            attn = "model.visual.blocks.1.attn"
            qkv, proj = mods[f"{attn}.qkv"], mods[f"{attn}.proj"]
            dim = proj.in_features                  # qkv rows: [q | k | v], v = rows 2·dim + j
            for j in CHANNELS:
                qkv.weight[2 * dim + j] *= 1000.0
                qkv.bias[2 * dim + j] *= 1000.0
                proj.weight[:, j] /= 100.0
            return f"{attn}.proj"
    raise ValueError(site)


