"""Skip names that vLLM's bitsandbytes loader understands, from the plan's 16-bit layers.

vLLM decides per layer with ``is_layer_skipped_bnb(prefix, llm_int8_skip_modules)``: a layer is
kept unquantized when a skip name equals one dot-component of its prefix or one of the prefix's
dot-boundary heads ("a.b" skips "a.b.c" but not "a.bc"). Its prefixes are vLLM's own module names:
the checkpoint's prefixes renamed (``model.language_model.`` → ``language_model.model.``, ...) and
fused layers (q/k/v → ``qkv_proj``, gate/up → ``gate_up_proj``). A fused layer can only be skipped
whole, which is why the sensitivity analysis protects fused siblings together.

The renaming table and the fused groups are the family's (``family.vllm.module_renames``,
``family.vllm.fused_linears``, following vLLM's ``hf_to_vllm_mapper`` of each model class, vLLM ≥ 0.10,
transformers-5 checkpoint layout); they are not exercised by a test here (no vLLM on this machine).
"""

from __future__ import annotations

from vlm.families import Family, get_family


def _rename(name: str, table) -> str:
    for old, new in table:
        if name == old or name.startswith(old):
            return new + name[len(old):]
    return name


def vllm_skip_names(family: str | Family, kept: list[str]) -> tuple[list[str], list[str]]:
    """(vLLM skip names, kept layers vLLM cannot skip alone: a fused sibling is quantized)."""
    fam = get_family(family) if isinstance(family, str) else family
    if fam.vllm is None:
        return [], []
    table, fused_linears = fam.vllm.module_renames, dict(fam.vllm.fused_linears)
    kept_set = set(kept)
    names, partial = set(), []
    for n in kept:
        parent, _, leaf = n.rpartition(".")
        fused = next(((sib, new) for sib, new in fused_linears.items() if leaf in sib), None)
        if fused is None:
            names.add(_rename(n, table))
            continue
        sib, new = fused
        if all(f"{parent}.{s}" in kept_set for s in sib):
            names.add(_rename(f"{parent}.{new}", table))
        else:
            partial.append(n)
    return sorted(names), sorted(partial)
