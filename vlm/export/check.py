"""``--check-vllm``: will vLLM serve this LoRA adapter as trained? The one source of these rules.

Each rule records what vLLM 0.32 was seen to do (../shared/ENVIRONMENT.md) and says how to fix it.
A *refusal* (``fatal``) is something vLLM rejects outright (``modules_to_save``, lm_head/embedding
LoRA, DoRA, a rank above its maximum, a module it has no LoRA layer for) or would silently serve
differently from what was trained (vision LoRA on a family whose tower vLLM cannot adapt). A
*warning* is served, with a caveat. ``vlm serve`` refuses to start on any refusal: a rejected
adapter kills an offline vLLM engine and leaves the HTTP server answering 500s.

``vlm.lora.vllm_serving_warnings`` (used at training time) calls :func:`vllm_rules` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlm.errors import VlmError
from vlm.export.adapter import AdapterInfo, read_adapter
from vlm.families import Family
from vlm.families.base import VLLM_LORA_RANKS

MERGED = "serve a merged checkpoint instead: vlm export ADAPTER --merged OUT, then vlm serve OUT"


@dataclass(frozen=True)
class Problem:
    code: str          # short id: "modules_to_save", "lm_head", "rank", ...
    message: str       # what is wrong
    fix: str           # what to do about it
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.message}; fix: {self.fix}"


class AdapterRejected(VlmError):
    """vLLM would reject (or silently mis-serve) this adapter."""


def max_lora_rank_for(ranks: list[int]) -> int:
    """The smallest ``--max-lora-rank`` vLLM allows that covers every rank (vLLM's allowed set)."""
    top = max(ranks)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= top:
            return allowed
    raise AdapterRejected(f"LoRA rank {top} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}; {MERGED}")


def vllm_rules(family: Family, target_names: list[str], r: int | list[int], modules_to_save: list[str],
               *, embedding_targets: list[str] = (), use_dora: bool = False, bias: str = "none",
               ) -> list[Problem]:
    """Problems vLLM has with LoRA on ``target_names`` (full module names) for ``family``."""
    ranks = [r] if isinstance(r, int) else list(r)
    out: list[Problem] = []
    vs = family.vllm
    if vs is None or not vs.lora:
        out.append(Problem("family", f"vLLM does not serve LoRA adapters for {family.name}", MERGED))
    if max(ranks) > VLLM_LORA_RANKS[-1]:
        out.append(Problem("rank", f"rank {max(ranks)} is above vLLM's maximum LoRA rank "
                           f"{VLLM_LORA_RANKS[-1]}", f"train with r <= {VLLM_LORA_RANKS[-1]} or {MERGED}"))
    comps = {n: family.component_of(n) for n in target_names}
    head = sorted(n for n, c in comps.items() if c in ("lm_head", "embeddings")) + sorted(embedding_targets)
    if head:
        out.append(Problem("lm_head", f"LoRA on lm_head/embeddings ({', '.join(head[:3])}) is rejected by "
                           "vLLM", f"train without lm_head/embed_tokens targets, or {MERGED}"))
    if modules_to_save:
        out.append(Problem("modules_to_save", f"modules_to_save ({', '.join(modules_to_save[:3])}) is "
                           "rejected by vLLM (it loads only LoRA A/B pairs)",
                           f"train without modules_to_save, or {MERGED}"))
    if use_dora:
        out.append(Problem("dora", "DoRA adapters (use_dora) are rejected by vLLM", MERGED))
    if bias not in ("none", None):
        out.append(Problem("bias", f"LoRA bias={bias!r} trains base biases, which vLLM does not load",
                           f"train with bias='none', or {MERGED}"))
    lang_leaves = set(family.lora_language_targets)
    odd = sorted(n for n, c in comps.items() if c == "language" and n.rsplit(".", 1)[-1] not in lang_leaves)
    if odd:
        out.append(Problem("targets", f"vLLM has no LoRA layer for {', '.join(odd[:3])} (it adapts "
                           f"{', '.join(sorted(lang_leaves))} in the language model)",
                           f"train on those targets only, or {MERGED}"))
    outside = sorted(n for n, c in comps.items() if c is None)
    if outside:
        out.append(Problem("targets", f"{', '.join(outside[:3])} lie outside every {family.name} component "
                           "(a different model layout?)", f"check the adapter's base model, or {MERGED}"))
    tower = sorted(n for n, c in comps.items() if c in ("vision", "projector"))
    if tower:
        if vs is not None and vs.tower_connector_lora:
            out.append(Problem("tower", f"vision/projector LoRA ({len(tower)} modules) is ignored by vLLM "
                               "unless served with --enable-tower-connector-lora (experimental: one "
                               "batch with every LoRA slot busy was seen to mix adapters)",
                               f"`vlm serve` sets the flag; for exact outputs {MERGED}", fatal=False))
        else:
            out.append(Problem("tower", f"vLLM cannot apply vision/projector LoRA for {family.name} "
                               f"({', '.join(tower[:3])}): it would be silently ignored", MERGED))
    return out


# PEFT options that change what an adapter means and that vLLM 0.32 refuses (vllm/lora/peft_helper.py).
_UNSUPPORTED_FEATURES = {
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "layer_replication",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QALoRA",
}
# init_lora_weights values that only set initial weights (a saved adapter is a plain LoRA).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def peft_feature_rules(cfg: dict) -> list[Problem]:
    """Problems from adapter_config.json options vLLM does not implement."""
    out = []
    for key, what in _UNSUPPORTED_FEATURES.items():
        if cfg.get(key):
            out.append(Problem("peft_feature", f"{what} ({key}) is not supported by vLLM", MERGED))
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        out.append(Problem("init", f"init_lora_weights={init!r} (PiSSA/OLoRA/CorDA/LoftQ) changes the base "
                           "weights, which vLLM does not", "convert it to a plain LoRA with PEFT's "
                           f"path_initial_model_for_weight_conversion, or {MERGED}"))
    return out


@dataclass
class CheckReport:
    adapter: Path
    family: Family
    info: AdapterInfo
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    @property
    def max_lora_rank(self) -> int:
        return max_lora_rank_for(self.info.ranks())

    def format(self) -> str:
        head = f"{self.adapter} ({self.family.name}, r={'/'.join(map(str, self.info.ranks()))}, " \
               f"{len(self.info.lora_modules)} LoRA modules): "
        if not self.problems:
            return head + "OK for vLLM"
        lines = [head + ("servable by vLLM, with warnings" if self.ok else "vLLM will NOT serve this adapter")]
        for p in self.problems:
            lines.append(f"  {'ERROR' if p.fatal else 'warning'} [{p.code}] {p.message}\n      fix: {p.fix}")
        return "\n".join(lines)


def _family_of(info: AdapterInfo, base: str | None) -> Family:
    from vlm.families import family_for_config
    from vlm.load import load_config

    source = base or info.base_model
    if not source:
        raise AdapterRejected(f"{info.path}/adapter_config.json names no base_model_name_or_path: pass the "
                              "base checkpoint explicitly (--base)")
    return family_for_config(load_config(source))


def check_adapter(path: str | Path, *, base: str | None = None, family: Family | None = None) -> CheckReport:
    """Read an adapter folder and apply :func:`vllm_rules` to what it really contains."""
    info = read_adapter(path)
    fam = family or _family_of(info, base)
    cfg = info.config
    problems: list[Problem] = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(Problem("peft_type", f"peft_type {cfg.get('peft_type')!r} is not LoRA; vLLM serves "
                                "LoRA adapters only", MERGED))
    linear = [m for m, kinds in info.lora_modules.items() if {"lora_A", "lora_B"} & kinds]
    emb = [m for m, kinds in info.lora_modules.items() if {"lora_embedding_A", "lora_embedding_B"} & kinds]
    dora = bool(cfg.get("use_dora")) or any("lora_magnitude_vector" in k for k in info.lora_modules.values())
    saved = sorted(cfg.get("modules_to_save") or [])
    full = [m for m in info.full_modules if not any(m == s or m.endswith("." + s) for s in saved)]
    bias = "lora_bias" if cfg.get("lora_bias") else cfg.get("bias", "none")
    problems += vllm_rules(fam, linear, info.ranks(), saved, embedding_targets=emb, use_dora=dora, bias=bias)
    if full:
        problems.append(Problem("full_weights", f"the adapter carries full weight copies of {', '.join(full[:3])} "
                                "(PEFT saves these for embedding targets or save_embedding_layers); vLLM loads "
                                "only LoRA A/B tensors", f"re-save with save_embedding_layers=False, or {MERGED}"))
    problems += peft_feature_rules(cfg)
    if not linear and not emb:
        problems.append(Problem("empty", "the adapter holds no LoRA tensors", "re-save the trained adapter"))
    return CheckReport(adapter=info.path, family=fam, info=info, problems=problems)


def require_servable(path: str | Path, **kw) -> CheckReport:
    """:func:`check_adapter`, raising :class:`AdapterRejected` (with every problem) on a refusal."""
    report = check_adapter(path, **kw)
    if not report.ok:
        raise AdapterRejected(report.format())
    return report
