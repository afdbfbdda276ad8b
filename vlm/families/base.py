"""The family record: what a VLM architecture is made of, declared once.

A family answers, for every checkpoint it covers: which config ``model_type``s it is; the full module
names of its components (vision tower, projector, language model, lm_head, embeddings); the
language-side LoRA target names; how images become tokens; and what vLLM can serve LoRA on. Code
elsewhere asks the record (``family.component_of(name)``) instead of branching on family names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

COMPONENTS = ("vision", "projector", "language", "lm_head", "embeddings")

# vLLM's allowed LoRA ranks (vllm/config/lora.py: max_lora_rank choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class VllmSupport:
    """What vLLM can serve for this family."""

    architecture: str                      # vLLM's class for the main model type (merged exports
                                           # write the model's own transformers class instead)
    lora: bool = True                      # language-side LoRA served
    tower_connector_lora: bool = False     # vision/projector LoRA (experimental flag in vLLM)
    bnb_4bit: bool = True                  # vLLM's bitsandbytes loader supports the family


@dataclass(frozen=True)
class GgufSupport:
    """What llama.cpp (and Ollama on top of it) runs for this family: how its projector GGUF is
    made, and the Ollama chat template (Go template syntax) and stop strings of its chat format."""

    mmproj: str                            # "converter": convert_hf_to_gguf.py --mmproj;
                                           # "clip_legacy": llama.cpp's CLIP + LLaVA-projector script
    ollama_template: str
    stop: tuple[str, ...]


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
    # messages -> messages the checkpoint's template renders right (e.g. where a system prompt goes)
    shape_messages: Callable[[list[dict]], list[dict]] | None = None
    image_token_rule: str = ""             # how the processor expands it (documentation)
    zoo_variants: tuple[str, ...] = ()     # tiny builders in vlm.zoo that produce this family
    vllm: VllmSupport | None = None
    gguf: GgufSupport | None = None        # None: llama.cpp cannot run the family (export refuses)
    # extra predicate on the config (e.g. LLaVA layout with a Pixtral vision tower)
    config_matches: Callable[[Any], bool] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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

    @property
    def lora_language_targets(self) -> tuple[str, ...]:
        return self.lora_attention + self.lora_mlp
