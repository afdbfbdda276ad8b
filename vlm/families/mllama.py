"""Llama-3.2-Vision (Mllama): vision encoder + projector feeding gated cross-attention layers."""

from vlm.families.base import Family, VllmSupport, llava_style_vllm_renames

FAMILY = Family(
    name="mllama",
    description="Llama-3.2-Vision (Mllama: tiled vision encoder + cross-attention decoder)",
    model_types=("mllama",),
    component_prefixes={
        "vision": ("model.vision_model",),
        "projector": ("model.multi_modal_projector",),
        "language": ("model.language_model",),
        "embeddings": ("model.language_model.embed_tokens",),
        "lm_head": ("lm_head",),
    },
    language_layers="model.language_model.layers",
    image_placeholder="<|image|>",
    end_of_turn="<|eot_id|>",
    image_token_rule="cross_attention: one <|image|> token per image; pixels enter through "
                     "cross-attention (aspect_ratio_ids / aspect_ratio_mask / cross_attention_mask)",
    zoo_variants=("mllama",),
    vllm=VllmSupport(architecture="MllamaForConditionalGeneration", lora=True, bnb_4bit=True,
                     module_renames=llava_style_vllm_renames("vision_model"),
                     serving_gap=("any checkpoint with transformers 5.19 (not a tensor-name problem): vLLM "
                                  "0.32 has no Mllama model of its own (removed in 0.10.2) and falls back "
                                  "to its Transformers backend, whose input processing calls "
                                  "MllamaProcessor._get_num_multimodal_tokens, which transformers 5.19 "
                                  "does not have (the server exits at start-up)")),
    vision_blocks=("model.vision_model.transformer.layers", "model.vision_model.global_transformer.layers"),
    cross_attention_images=True,
    images_per_sample=True,
)
