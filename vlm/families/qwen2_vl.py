"""Qwen2-VL and Qwen2.5-VL: ViT with 2×2 patch merger (the projector) + Qwen2 decoder with M-RoPE."""

from vlm.families.base import Family, GgufSupport, LanguageKernels, VllmSupport

FAMILY = Family(
    name="qwen2_vl",
    description="Qwen2-VL / Qwen2.5-VL (ViT + PatchMerger + Qwen2 decoder, multimodal RoPE)",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    component_prefixes={
        "vision": ("model.visual",),
        "projector": ("model.visual.merger",),
        "language": ("model.language_model",),
        "embeddings": ("model.language_model.embed_tokens",),
        "lm_head": ("lm_head",),
    },
    language_layers="model.language_model.layers",
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    end_of_turn="<|im_end|>",
    takes_video=True,   # <|video_pad|> × (t/2)·h·w/merge², t = sampled frames (2 per temporal patch)
    image_token_rule="grid: <|image_pad|> repeated (t·h·w)/merge² times between vision start/end",
    zoo_variants=("qwen2_vl", "qwen2_5_vl"),
    vllm=VllmSupport(architecture="Qwen2VLForConditionalGeneration", tower_connector_lora=True,
                     module_renames=(("model.language_model.", "language_model.model."),
                                     ("model.visual.", "visual."), ("lm_head", "language_model.lm_head"))),
    vision_blocks=("model.visual.blocks",),
    batched_vision_attention=("modeling_qwen2_vl.VisionAttention",
                              "modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention"),
    language_kernels=LanguageKernels(rope="mrope"),
    needs_mm_token_type_ids=True,
    size_in_pixels=True,
    # ChatML, with the default system prompt the HF template adds when none is given
    gguf=GgufSupport(
        mmproj="converter",
        ollama_template=(
            "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
            "{{ else }}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{{ end }}"
            "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n"),
        stop=("<|im_end|>", "<|endoftext|>")),
)
