"""Skip names that vLLM's bitsandbytes loader understands, from the plan's 16-bit layers.

vLLM decides per layer with ``is_layer_skipped_bnb(prefix, llm_int8_skip_modules)``: a layer is
kept unquantized when a skip name equals one dot-component of its prefix or one of the prefix's
dot-boundary heads ("a.b" skips "a.b.c" but not "a.bc"). Its prefixes are vLLM's own module names:
the checkpoint's prefixes renamed (``model.language_model.`` → ``language_model.model.``, ...) and
fused layers (q/k/v → ``qkv_proj``, gate/up → ``gate_up_proj``). A fused layer can only be skipped
whole, which is why the sensitivity analysis protects fused siblings together.

The renaming tables follow vLLM's ``hf_to_vllm_mapper`` of each family's model class (vLLM ≥ 0.10,
transformers-5 checkpoint layout); they are not exercised by a test here (no vLLM on this machine).
"""

from __future__ import annotations

VLLM_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen2_vl": (("model.language_model.", "language_model.model."), ("model.visual.", "visual."),
                 ("lm_head", "language_model.lm_head")),
    "llava": (("model.language_model.", "language_model.model."),
              ("model.vision_tower.", "vision_tower."),
              ("model.multi_modal_projector.", "multi_modal_projector."),
              ("lm_head", "language_model.lm_head")),
    "pixtral": (("model.language_model.", "language_model.model."),
                ("model.vision_tower.", "vision_tower."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
                ("lm_head", "language_model.lm_head")),
    "mllama": (("model.language_model.", "language_model.model."),
               ("model.vision_model.", "vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector."),
               ("lm_head", "language_model.lm_head")),
}
_FUSED = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def _rename(name: str, table) -> str:
    for old, new in table:
        if name == old or name.startswith(old):
            return new + name[len(old):]
    return name


def vllm_skip_names(family: str, kept: list[str]) -> tuple[list[str], list[str]]:
    """(vLLM skip names, kept layers vLLM cannot skip alone: a fused sibling is quantized)."""
    table = VLLM_PREFIXES.get(family)
    if table is None:
        return [], []
    kept_set = set(kept)
    names, partial = set(), []
    for n in kept:
        parent, _, leaf = n.rpartition(".")
        fused = next(((sib, new) for sib, new in _FUSED.items() if leaf in sib), None)
        if fused is None:
            names.add(_rename(n, table))
            continue
        sib, new = fused
        if all(f"{parent}.{s}" in kept_set for s in sib):
            names.add(_rename(f"{parent}.{new}", table))
        else:
            partial.append(n)
    return sorted(names), sorted(partial)
