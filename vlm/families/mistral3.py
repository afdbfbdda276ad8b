"""Mistral-Small-3.1 (Mistral3): Pixtral vision tower + projector (RMSNorm, 2x2 patch merger,
2-layer GELU MLP) + Mistral decoder."""

from vlm.families.base import Family, GgufSupport, llava_style_components, llava_style_vllm_renames, VllmSupport

FAMILY = Family(
    name="mistral3",
    description="Mistral-Small-3.1 (Pixtral vision + patch-merger projector + Mistral)",
    model_types=("mistral3",),
    component_prefixes=llava_style_components(),
    language_layers="model.language_model.layers",
    end_of_turn="</s>",
    image_placeholder="[IMG]",
    image_token_rule="rows of merged 2x2 patches: [IMG]×cols then [IMG_BREAK] per row, the last "
                     "row ending in [IMG_END]",
    zoo_variants=("mistral3",),
    vllm=VllmSupport(architecture="Mistral3ForConditionalGeneration",
                     module_renames=llava_style_vllm_renames("vision_tower")),
    vision_blocks=("model.vision_tower.transformer.layers",),
    # llama.cpp's Pixtral projector with the patch merger (convert_hf_to_gguf.py --mmproj; the
    # [IMG_BREAK] row let through its tensor filter, as for Pixtral)
    gguf=GgufSupport(
        mmproj="converter",
        ollama_template=(
            "{{- if .System }}[SYSTEM_PROMPT]{{ .System }}[/SYSTEM_PROMPT]{{ end }}"
            "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST]{{ .Content }}[/INST]"
            "{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}"),
        stop=("</s>", "[INST]"),
        # 4x3 merged tokens of 2x2 14-px patches: under the zoo's longest edge (112) and inside
        # llama.cpp's fixed budget of 8..1024 tokens, so neither side resizes
        probe_size=(112, 84),
        image_break_token="[IMG_BREAK]"),
)
