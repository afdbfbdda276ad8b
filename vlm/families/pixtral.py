"""Pixtral in the HF LLaVA layout: Pixtral ViT (2-D RoPE, any resolution) + projector + Mistral."""

from vlm.families.base import Family, VllmSupport, llava_style_vllm_renames


def _pixtral_vision(config) -> bool:
    return getattr(getattr(config, "vision_config", None), "model_type", None) == "pixtral"


FAMILY = Family(
    name="pixtral",
    description="Pixtral (HF llava layout: Pixtral vision + projector + Mistral)",
    model_types=("llava",),
    config_matches=_pixtral_vision,
    component_prefixes={
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        "language": ("model.language_model",),
        "embeddings": ("model.language_model.embed_tokens",),
        "lm_head": ("lm_head",),
    },
    language_layers="model.language_model.layers",
    image_placeholder="[IMG]",
    image_token_rule="rows: [IMG]×cols then [IMG_BREAK] per row, the last row ending in [IMG_END]",
    zoo_variants=("pixtral",),
    vllm=VllmSupport(architecture="LlavaForConditionalGeneration",
                     module_renames=llava_style_vllm_renames("vision_tower")),
    vision_blocks=("model.vision_tower.transformer.layers",),
)
