"""Qwen3-VL: ViT with learned position embedding, a 2x2 patch merger and DeepStack mergers (the
projector) + Qwen3 decoder (q/k RMSNorm) with interleaved multimodal RoPE.

DeepStack: the mergers in ``model.visual.deepstack_merger_list`` turn the features of chosen vision
blocks into embeddings added to the image positions of the first decoder layers, so they belong to
the projector (kept 16-bit with it) though they live inside the vision tower.
"""

from vlm.families.base import Family, GgufSupport, LanguageKernels, VideoFrameWrap, VllmSupport

FAMILY = Family(
    name="qwen3_vl",
    description="Qwen3-VL (ViT + merger + DeepStack mergers + Qwen3 decoder, interleaved M-RoPE)",
    model_types=("qwen3_vl",),
    component_prefixes={
        "vision": ("model.visual",),
        "projector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
        "language": ("model.language_model",),
        "embeddings": ("model.language_model.embed_tokens",),
        "lm_head": ("lm_head",),
    },
    language_layers="model.language_model.layers",
    end_of_turn="<|im_end|>",
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    image_token_rule="grid: <|image_pad|> repeated (t·h·w)/merge² times between vision start/end "
                     "(16-px patches)",
    # a video's <|video_pad|> becomes, per temporal patch (2 frames), "<1.4 seconds>" (the patch's
    # mean frame time) + <|vision_start|> + <|video_pad|> × h·w/merge² + <|vision_end|>
    takes_video=True,
    video_frame_wrap=VideoFrameWrap(timestamp="<{:.1f} seconds>", before="<|vision_start|>",
                                    after="<|vision_end|>"),
    zoo_variants=("qwen3_vl",),
    vllm=VllmSupport(architecture="Qwen3VLForConditionalGeneration",
                     module_renames=(("model.language_model.", "language_model.model."),
                                     ("model.visual.", "visual."), ("lm_head", "language_model.lm_head"))),
    vision_blocks=("model.visual.blocks",),
    batched_vision_attention=("modeling_qwen3_vl.Qwen3VLVisionAttention",),
    language_kernels=LanguageKernels(rope="mrope_interleaved"),
    needs_mm_token_type_ids=True,
    size_in_pixels=True,
    # convert_hf_to_gguf.py --mmproj writes the ViT, merger and DeepStack mergers (llama.cpp's qwen3vl)
    gguf=GgufSupport(
        mmproj="converter",
        ollama_template=(
            "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n"),
        stop=("<|im_end|>", "<|endoftext|>"),
        # a multiple of 32 px (16-px patches, 2x2 merge) each way, inside the zoo's pixel limits:
        # neither transformers nor llama.cpp resizes it
        probe_size=(128, 96)),
)
