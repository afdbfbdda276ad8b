"""The family record: what a VLM architecture is made of, declared once.

A family answers, for every checkpoint it covers: which config ``model_type``s it is; the full module
names of its components (vision tower, projector, language model, lm_head, embeddings); the
language-side LoRA target names; how images become tokens; and what vLLM can serve LoRA on. Code
elsewhere asks the record (``family.component_of(name)``) instead of branching on family names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

COMPONENTS = ("vision", "projector", "language", "lm_head", "embeddings")

# vLLM's allowed LoRA ranks (vllm/config/lora.py: max_lora_rank choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# vLLM fuses these sibling projections into one layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj):
# a fused layer is quantized or kept whole, so the sensitivity analysis protects siblings together.
FUSED_LINEARS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj"))

# The component map of the transformers-5 "LLaVA layout" (LLaVA, Pixtral, Gemma 3, Mistral 3): the
# tower under model.vision_tower, the projector under model.multi_modal_projector, the decoder
# under model.language_model. A function, so each family gets its own dict.
def llava_style_components() -> dict[str, tuple[str, ...]]:
    return {"vision": ("model.vision_tower",), "projector": ("model.multi_modal_projector",),
            "language": ("model.language_model",), "embeddings": ("model.language_model.embed_tokens",),
            "lm_head": ("lm_head",)}


# The checkpoint -> vLLM module renaming of the families whose vLLM class nests the text model as
# ``language_model.model`` (vLLM's ``hf_to_vllm_mapper``, transformers-5 checkpoint layout).
# ``vllm_vision``: vLLM's module path of the tower where it differs from ``vision`` (a CLIP/SigLIP
# tower that vLLM, like the hub's checkpoints, nests as ``vision_tower.vision_model``).
def llava_style_vllm_renames(vision: str, vllm_vision: str | None = None) -> tuple[tuple[str, str], ...]:
    return (("model.language_model.", "language_model.model."), (f"model.{vision}.", f"{vllm_vision or vision}."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("lm_head", "language_model.lm_head"))


@dataclass(frozen=True)
class KeyRename:
    """One rule of the hub checkpoint layout: a saved tensor name that starts with ``saved`` (and not
    already with ``hub``) is written as ``hub`` + the rest of the name.

    Why: transformers 5 flattens some towers (``CLIPVisionModel``/``SiglipVisionModel`` lost their
    ``vision_model`` level) and on save writes the flattened names; the hub's checkpoints, vLLM and
    transformers 4 know only the nested ones, and transformers 5 loads both (its checkpoint
    conversion mapping). The ``hub``-prefix guard makes the rule idempotent: a model loaded from a
    hub checkpoint is already written back in the hub's names."""

    saved: str
    hub: str

    def apply(self, key: str) -> str:
        if key.startswith(self.saved) and not key.startswith(self.hub):
            return self.hub + key[len(self.saved):]
        return key


# CLIP / SigLIP towers under ``vision_tower``: transformers 5 saves vision_tower.embeddings/encoder/...,
# the hub's checkpoints (the names vLLM and llama.cpp's converter know) nest them in vision_model
NESTED_VISION_TOWER = KeyRename(saved="vision_tower.", hub="vision_tower.vision_model.")


@dataclass(frozen=True)
class VllmSupport:
    """What vLLM can serve for this family."""

    architecture: str                      # vLLM's class for the main model type (merged exports
                                           # write the model's own transformers class instead)
    lora: bool = True                      # language-side LoRA served
    tower_connector_lora: bool = False     # vision/projector LoRA (experimental flag in vLLM)
    bnb_4bit: bool = True                  # vLLM's bitsandbytes loader supports the family
    # checkpoint module prefix -> vLLM's module prefix (first match wins); empty = same names
    module_renames: tuple[tuple[str, str], ...] = ()
    fused_linears: tuple[tuple[tuple[str, ...], str], ...] = FUSED_LINEARS
    # what the pinned vLLM (0.32) cannot serve of what this project makes for the family, and why
    # (measured by tests/vlm/serve/test_serve_families.py); "" = it serves it
    serving_gap: str = ""


@dataclass(frozen=True)
class LanguageKernels:
    """The language decoder's math, as the Triton kernels need to know it (``vlm.kernels.patch``).

    rms_norm_weight_offset: y = x / rms(x) · (offset + w): 0 for Llama/Qwen/Mistral, 1 for Gemma
        (whose weights are stored as w − 1, zero-initialised).
    mlp_activation: the gated MLP down(act(gate(x)) · up(x)): ``silu`` (SwiGLU) or ``gelu_tanh``
        (GeGLU with the tanh approximation of GELU, Gemma).
    rope: how positions rotate q and k: ``rope`` (1-D), ``mrope`` (Qwen2-VL: contiguous t/h/w
        sections), ``mrope_interleaved`` (Qwen3-VL: t,h,w,t,h,w,...). In every case transformers
        builds cos/sin per token first, so the RoPE kernel takes them as they are.
    logit_softcapping: the model's forward caps its logits at the text config's
        ``final_logit_softcapping`` (c·tanh(z/c), Gemma 2 style), so the fused CE must too. Gemma 3's
        configs carry the key, but ``Gemma3ForConditionalGeneration`` does not apply it
        (transformers 5.17-5.19; only the text-only ``Gemma3ForCausalLM`` does).
    """

    rms_norm_weight_offset: float = 0.0
    mlp_activation: Literal["silu", "gelu_tanh"] = "silu"
    rope: Literal["rope", "mrope", "mrope_interleaved"] = "rope"
    logit_softcapping: bool = False


@dataclass(frozen=True)
class ImageWrap:
    """What a processor writes for each image when it writes more than its image token repeated.

    The text's placeholder P becomes ``before + P + token * n + after`` (n: the processor's image
    token count); the collator tokenizes that text itself, so tokens merged across the inserted
    text (a newline before two inserted ones become one token) are the processor's too."""

    before: str
    token: str
    after: str


@dataclass(frozen=True)
class VideoFrameWrap:
    """What a processor writes for each temporal patch of a video besides its tokens (Qwen3-VL).

    A video of T temporal patches (``temporal_patch_size`` sampled frames each) and n tokens per
    patch becomes, in place of its placeholder token, for k = 1..T:
    ``timestamp.format(t_k) + before + token * n + after``, where t_k is the mean of the times of the
    first and last frame of patch k (``vlm.data_formats.video.patch_times``). The collator counts
    those tokens before any frame is decoded, as it does for images."""

    timestamp: str
    before: str
    after: str


@dataclass(frozen=True)
class GgufSupport:
    """What llama.cpp (and Ollama on top of it) runs for this family: how its projector GGUF is
    made, and the Ollama chat template (Go template syntax) and stop strings of its chat format."""

    mmproj: str                            # "converter": convert_hf_to_gguf.py --mmproj;
                                           # "clip_legacy": llama.cpp's CLIP + LLaVA-projector script
    ollama_template: str
    stop: tuple[str, ...]
    # (width, height) of the image the GGUF check uses, where the family's two preprocessors (its
    # transformers processor, llama.cpp's mtmd) would resize the default probe differently
    probe_size: tuple[int, int] | None = None
    # the token transformers writes between rows of image patches, whose embedding llama.cpp's
    # projector puts inside the image (Pixtral's [IMG_BREAK])
    image_break_token: str | None = None
    # a defect of llama.cpp's runtime (the pinned version) that makes its output differ from
    # transformers' for this family although the files are right: printed by the export
    runtime_caveat: str | None = None
    # (old, new) tensor-name prefixes the projector converter should read renamed: where transformers
    # saves a tower under other names than the hub checkpoints the converter's tensor map knows
    mmproj_renames: tuple[tuple[str, str], ...] = ()
    # (before, after): text the family's processor writes around each image that llama.cpp's mtmd
    # does not (mtmd writes only the image's begin/end tokens): put around the media marker so
    # llama.cpp sees the prompt transformers was trained on (Gemma 3: "\n\n" on both sides)
    marker_context: tuple[str, str] = ("", "")
    # the converter should write which layers are sliding-window ones from the config's layer_types
    # (it leaves llama.cpp to assume the real checkpoints' pattern: see gguf_convert)
    layer_types_pattern: bool = False
    # the converter reads this family's vocabulary from the SentencePiece model (tokenizer.model)
    # the hub's checkpoints ship; without it the export is refused by name
    needs_sentencepiece_model: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    model_types: tuple[str, ...]
    # component -> module-name prefixes (full names in the *ForConditionalGeneration model).
    # The longest matching prefix wins, so the projector may sit inside the vision tower.
    component_prefixes: dict[str, tuple[str, ...]]
    # Path of the ModuleList holding the language decoder layers.
    language_layers: str
    lora_attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    image_placeholder: str = "<image>"     # what a dataset's `<image>` becomes in this family's text
    # Chat-template needs (read by vlm.data_formats.chat_render):
    end_of_turn: str = ""                  # the token closing an assistant turn (generation stops at
                                           # it); trained after every reply, appended where the
                                           # checkpoint's template writes none
    takes_video: bool = False              # video records train (frames through the processor's
                                           # video path); other families refuse them by name
    video_frame_wrap: VideoFrameWrap | None = None   # text around each temporal patch's tokens
    # messages -> messages the checkpoint's template renders right (e.g. where a system prompt goes)
    shape_messages: Callable[[list[dict]], list[dict]] | None = None
    image_token_rule: str = ""             # how the processor expands it (documentation)
    zoo_variants: tuple[str, ...] = ()     # tiny builders in vlm.zoo that produce this family
    vllm: VllmSupport | None = None
    gguf: GgufSupport | None = None        # None: llama.cpp cannot run the family (export refuses)
    # extra predicate on the config (e.g. LLaVA layout with a Pixtral vision tower)
    config_matches: Callable[[Any], bool] | None = None
    # How this project's saved checkpoints (merged exports, full fine-tunes, the zoo) are renamed
    # into the hub's layout after transformers writes them (first matching rule wins); empty: the
    # names transformers writes are the hub's (vlm.checkpoint_layout applies the rules).
    hub_layout: tuple[KeyRename, ...] = ()
    # Full names of the ModuleLists of vision transformer blocks (compiled one by one when frozen);
    # alternatives where transformers versions nest the tower differently (those present are used).
    vision_blocks: tuple[str, ...] = ()
    # Vision attention classes (``modeling_x.ClassName``, matched as the end of the class's
    # qualified name) whose images ``vlm.vision_attention`` batches into one attention call per
    # block: Qwen-style towers that pack every image into one sequence and loop over them. Empty:
    # the tower already batches (fixed-size images) and is left as it is.
    batched_vision_attention: tuple[str, ...] = ()
    language_kernels: LanguageKernels = LanguageKernels()
    # Images enter through cross-attention (Mllama): one placeholder token per image, images
    # grouped per sample for the processor.
    cross_attention_images: bool = False
    # The processor takes images as one list per sample (Mllama, Gemma 3), not one flat list.
    images_per_sample: bool = False
    # Image tokens attend to each other both ways inside an image (Gemma 3's training mask), so the
    # language attention is not purely causal: packed rows keep a block mask (no varlen kernel).
    bidirectional_image_attention: bool = False
    # The forward needs the processor's ``mm_token_type_ids`` to place M-RoPE positions.
    needs_mm_token_type_ids: bool = False
    # The image processor's ``size`` holds pixel counts {shortest_edge: min_pixels,
    # longest_edge: max_pixels} (Qwen2-VL's processor) instead of edge lengths.
    size_in_pixels: bool = False
    # What the processor writes around each image's tokens, when it writes more than the image
    # token repeated (Gemma 3); None: the placeholder token is repeated in place.
    image_wrap: ImageWrap | None = None

    def matches(self, config: Any) -> bool:
        if getattr(config, "model_type", None) not in self.model_types:
            return False
        return self.config_matches is None or bool(self.config_matches(config))

    def component_of(self, module_name: str) -> str | None:
        """The component a module belongs to (longest prefix wins), or None if outside all."""
        best, best_len = None, -1
        for comp, prefixes in self.component_prefixes.items():
            for p in prefixes:
                if (module_name == p or module_name.startswith(p + ".")) and len(p) > best_len:
                    best, best_len = comp, len(p)
        return best

    def component_modules(self, model: Any) -> dict[str, list[str]]:
        """Component -> names of the modules of ``model`` that belong to it (every module but the
        containers that hold several components, such as the root and ``model``)."""
        found: dict[str, list[str]] = {c: [] for c in self.component_prefixes}
        for name, _ in model.named_modules(remove_duplicate=False):
            comp = self.component_of(name)
            if comp is not None:
                found[comp].append(name)
        return found

    def component_roots(self, model: Any, component: str) -> list[tuple[str, Any]]:
        """(prefix, module) for each of the component's prefixes present in ``model`` (a PEFT
        wrapper is looked through)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        found = []
        for prefix in self.component_prefixes.get(component, ()):
            try:
                found.append((prefix, base.get_submodule(prefix)))
            except AttributeError:
                continue
        return found

    def hub_key(self, key: str) -> str:
        """The hub checkpoint's name for a tensor name as transformers saves it (``hub_layout``)."""
        for rule in self.hub_layout:
            renamed = rule.apply(key)
            if renamed != key:
                return renamed
        return key

    @property
    def lora_language_targets(self) -> tuple[str, ...]:
        return self.lora_attention + self.lora_mlp
