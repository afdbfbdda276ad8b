"""Pixtral in the HF LLaVA layout: Pixtral ViT (2-D RoPE, any resolution) + projector + Mistral."""

from vlm.families.base import Family, GgufSupport, llava_style_components, llava_style_vllm_renames, VllmSupport


def _pixtral_vision(config) -> bool:
    return getattr(getattr(config, "vision_config", None), "model_type", None) == "pixtral"


def system_into_last_user(messages: list[dict]) -> list[dict]:
    """Pixtral's (Mistral's) template writes the system prompt as a *string* into the *last* user
    turn only ("[INST]{system}\n\n{user}[/INST]"): given a list of parts it fails
    (``str + list``), and in a conversation ending with a reply it drops the prompt. So the prompt
    goes where the template puts it at inference time: text at the start of the last user turn."""
    system = "\n\n".join("".join(c["text"] for c in m["content"] if c["type"] == "text")
                          if isinstance(m["content"], list) else m["content"]
                          for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if len(rest) == len(messages) or not users:
        return messages
    if not system:
        return rest
    last = rest[users[-1]]
    rest[users[-1]] = {**last, "content": [{"type": "text", "text": system + "\n\n"}, *last["content"]]}
    return rest


FAMILY = Family(
    name="pixtral",
    description="Pixtral (HF llava layout: Pixtral vision + projector + Mistral)",
    model_types=("llava",),
    config_matches=_pixtral_vision,
    component_prefixes=llava_style_components(),
    language_layers="model.language_model.layers",
    image_placeholder="[IMG]",
    end_of_turn="</s>",
    shape_messages=system_into_last_user,
    image_token_rule="rows: [IMG]×cols then [IMG_BREAK] per row, the last row ending in [IMG_END]",
    zoo_variants=("pixtral",),
    vllm=VllmSupport(architecture="LlavaForConditionalGeneration",
                     module_renames=llava_style_vllm_renames("vision_tower")),
    vision_blocks=("model.vision_tower.transformer.layers",),
    # llama.cpp's pixtral projector (convert_hf_to_gguf.py --mmproj); the [IMG_BREAK] embedding row
    # it needs is let through the converter's tensor filter (vlm/export/gguf_convert.py says why).
    gguf=GgufSupport(
        mmproj="converter",
        ollama_template=(
            "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST]{{ .Content }}[/INST]"
            "{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}"),
        stop=("</s>", "[INST]"),
        # 4x3 patches of 16 px: under the zoo's longest edge (64) and inside llama.cpp's fixed
        # Pixtral budget of 8..1024 patches (it ignores the checkpoint's longest_edge), so
        # neither side resizes; not square, so [IMG_BREAK] rows and columns are told apart.
        probe_size=(64, 48),
        image_break_token="[IMG_BREAK]"),
)
