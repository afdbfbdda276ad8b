"""Resolve a QuantPolicy against a concrete model: a precision for every linear, by full name.

Quantizable layers are modules whose type is exactly ``torch.nn.Linear`` (what transformers'
bitsandbytes integration converts). Each gets, in order:

1. its component's precision (``family.component_of(name)``; outside every component: 16-bit);
2. the last override whose glob matches its full name or the full name of one of its ancestors
   (``fnmatch``: ``model.visual.blocks.1`` covers that block only, ``*.mlp.down_proj`` every
   down projection); a glob that matches no module is an error;
3. for dynamic policies, "protected" (kept 16-bit, or stored int8w under ``tiers: [int8w, ...]``)
   when the sensitivity analysis chose it.

int8w layers (vlm.quant.int8_linear) are not bitsandbytes layers: transformers loads them 16-bit
(they are in the skip list, ``kept``), and the loader swaps them to ``Int8Linear`` after.

The plan also knows the rest of the model's parameters (embeddings, norms, convolutions) so it
can state whole-model bytes, and produces the ``llm_int8_skip_modules`` list that makes
transformers quantize exactly the planned layers (``skip_modules``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlm.errors import ConfigError, VlmError
from vlm.families.base import FUSED_LINEARS
from vlm.quant.metrics import layer_bytes
from vlm.quant.policy import INT8W, LOW_BIT, QUANTIZED, QuantPolicy


@dataclass
class LayerPlan:
    name: str
    component: str
    out_features: int
    in_features: int
    bias: bool
    precision: str                 # final precision
    base_precision: str            # before the sensitivity analysis
    reason: str                    # "component", "override <glob>", "protected", "outside components"
    group: str                     # fused-sibling group key (== name for singletons)
    index: int                     # position in module order (for plots)

    @property
    def params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    def nbytes(self, precision: str | None = None, double_quant: bool = True) -> int:
        return layer_bytes(self.out_features, self.in_features, precision or self.precision,
                           double_quant, self.bias)


@dataclass
class QuantPlan:
    policy: QuantPolicy
    family: str
    layers: dict[str, LayerPlan]
    other_params: int                       # parameters outside quantizable linears
    other_bytes: int                        # their bytes (load dtype)
    analysis: dict[str, Any] = field(default_factory=dict)   # sensitivity results, if any
    linear_names: tuple[str, ...] = ()      # every module name in the model (for skip checks)

    @property
    def quant_kind(self) -> str | None:
        kinds = {lp.precision for lp in self.layers.values() if lp.precision in QUANTIZED}
        return next(iter(kinds)) if kinds else None

    def quantized(self) -> list[str]:
        return [n for n, lp in self.layers.items() if lp.precision in QUANTIZED]

    def kept(self) -> list[str]:
        """Layers transformers loads 16-bit (not bitsandbytes): 16-bit ones and int8w ones."""
        return [n for n, lp in self.layers.items() if lp.precision not in QUANTIZED]

    def int8w(self) -> list[str]:
        """Layers stored as vlm.quant.int8_linear.Int8Linear (swapped in after the load)."""
        return [n for n, lp in self.layers.items() if lp.precision == INT8W]

    def count_by_component(self, precision: str | None = None) -> dict[str, int]:
        """Number of layers per component stored in ``precision`` (default: any quantized one)."""
        out: dict[str, int] = {}
        for lp in self.layers.values():
            hit = lp.precision in QUANTIZED if precision is None else lp.precision == precision
            if hit:
                out[lp.component] = out.get(lp.component, 0) + 1
        return out

    def total_bytes(self) -> int:
        dq = self.policy.double_quant
        return self.other_bytes + sum(lp.nbytes(double_quant=dq) for lp in self.layers.values())

    def nf4_preset_bytes(self) -> int:
        """Whole-model bytes of this model under the ``nf4`` preset (every vision, projector and
        language linear NF4 with double quantization; lm_head, embeddings and linears outside the
        components 16-bit): the reference of an ``NF4Multiple`` budget."""
        comps = QuantPolicy.preset("nf4").components
        prec = {n: comps.get(lp.component, "bf16") for n, lp in self.layers.items()}
        return self.bytes_if(prec, double_quant=True)

    def bytes_if(self, precision_of: dict[str, str], double_quant: bool = True) -> int:
        return self.other_bytes + sum(lp.nbytes(precision_of.get(n, lp.precision), double_quant)
                                      for n, lp in self.layers.items())

    def skip_modules(self, module_names: list[str] | None = None) -> list[str]:
        """Full names of every linear kept 16-bit, written so transformers skips exactly them.

        transformers (quantizers_utils.should_convert_module) skips a module when a key k gives
        ``re.match(k + "\\.", name) or re.match(k, name) or name.endswith(k)``: keys are regexes
        matched at the start without a boundary, so ``...blocks.1.mlp.fc1`` would also skip
        ``...blocks.1.mlp.fc10`` if such a module existed. A plain name is used where it matches
        no other module name; otherwise the anchored regex ``re.escape(name) + "$"``.

        This is the list saved in config.json (plain transformers and vLLM read it). Loading with
        it costs transformers one regex per (module, key) pair; ``skip_pattern`` is the load-time
        form. The ambiguity check here scans all names once per kept layer (one regex search over
        the newline-joined names), not once per pair.
        """
        names = list(module_names or self.linear_names or self.layers)
        text = names_text(names)
        out = []
        for n in self.kept():
            if skipped_by(n, text) - {n}:
                out.append(re.escape(n) + "$")
            else:
                out.append(n)
        return out

    def skip_pattern(self) -> list[str]:
        """The kept layers as ONE key for ``llm_int8_skip_modules`` at load time.

        The key is a trie regex of the full names, anchored at the end: for kept names
        ``a.b.q`` and ``a.b.k`` it is ``a\\.b\\.(?:k|q)$``. Under transformers' test above,
        ``re.match(key, name)`` holds exactly for the kept names; ``re.match(key + "\\.", name)``
        never does (nothing follows ``$``) and no module name ends with a regex. One compiled
        pattern (Python's re cache holds it) matched in time linear in the name's length,
        instead of 2 × (kept layers) regexes per module name: see benchmarks/quant_skip_cost.py.
        Empty list when nothing is kept.
        """
        kept = self.kept()
        return [trie_regex(kept) + "$"] if kept else []

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "family": self.family,
                "quant_kind": self.quant_kind, "double_quant": self.policy.double_quant,
                "bytes": self.total_bytes(),
                "counts": {"quantized": self.count_by_component(),
                           "total": _count_all(self.layers)},
                "protected": sorted(n for n, lp in self.layers.items() if lp.reason == "protected"
                                    and lp.precision != INT8W),
                "protected_int8w": sorted(n for n, lp in self.layers.items() if lp.reason == "protected"
                                          and lp.precision == INT8W),
                "int8w": self.int8w(),
                "overridden": {n: lp.reason[len("override "):] for n, lp in self.layers.items()
                               if lp.reason.startswith("override ")},
                "analysis": self.analysis}


def _count_all(layers: dict[str, LayerPlan]) -> dict[str, int]:
    out: dict[str, int] = {}
    for lp in layers.values():
        out[lp.component] = out.get(lp.component, 0) + 1
    return out


def names_text(names) -> str:
    """Module names joined by newlines, with a newline at both ends (for ``skipped_by``)."""
    return "\n" + "\n".join(names) + "\n"


def skipped_by(key: str, text: str) -> set[str]:
    """The names in ``text`` (``names_text``) that transformers skips for the key ``key``: the
    same test as ``_hf_skip_matches`` applied to every name, in one regex scan and one substring
    scan instead of a regex call per name."""
    hits = set()
    for m in re.finditer(r"(?m)^(?:" + key + ")", text):          # re.match(k, name) (covers k + "\.")
        hits.add(text[m.start():text.find("\n", m.start())])
    at = text.find(key + "\n")                          # name.endswith(k)
    while at != -1:
        hits.add(text[text.rfind("\n", 0, at) + 1:at + len(key)])
        at = text.find(key + "\n", at + 1)
    return hits


def trie_regex(names: list[str]) -> str:
    """A regex matching exactly the strings ``names`` (split at dots), sharing common prefixes."""
    trie: dict = {}
    for n in names:
        node = trie
        for part in n.split("."):
            node = node.setdefault(part, {})
        node[""] = {}                                   # end marker

    def emit(node: dict) -> str:
        alts = []
        for part in sorted(k for k in node if k):
            child = node[part]
            alt = re.escape(part)
            if any(child):                               # longer names continue below this part
                tail = r"\." + emit(child)
                alt += f"(?:{tail})?" if "" in child else tail
            alts.append(alt)
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return emit(trie)


def _hf_skip_matches(key: str, name: str) -> bool:
    """transformers' own test (quantizers_utils.should_convert_module, negated) for one key."""
    return bool(re.match(f"{key}\\.", name) or re.match(f"{key}", name) or name.endswith(key))


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


def group_key(name: str, family=None) -> str:
    """The fused-sibling group of a linear (``parent.q_proj+k_proj+v_proj``), or its own name: vLLM
    fuses the family's ``vllm.fused_linears`` into one layer, so the sensitivity analysis protects
    such siblings together and the skip list stays servable (without a family or vLLM support:
    the common q/k/v and gate/up groups)."""
    parent, _, leaf = name.rpartition(".")
    fused = family.vllm.fused_linears if family is not None and family.vllm is not None else FUSED_LINEARS
    for sib, _ in fused:
        if leaf in sib:
            return f"{parent}.{'+'.join(sib)}"
    return name


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def tied_lm_head(model: nn.Module) -> bool:
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return out is not None and inp is not None and out.weight is inp.weight


def resolve_plan(policy: QuantPolicy, model: nn.Module, family, *,
                 protected: set[str] | dict[str, str] = frozenset(),
                 analysis: dict | None = None, dtype_bytes: int = 2) -> QuantPlan:
    """The per-layer plan for ``model`` (a real or meta-device model) under ``policy``.

    ``protected``: names the sensitivity analysis keeps 16-bit (a set), or name → tier
    ("bf16"/"fp16" = 16-bit, "int8w") under ``tiers`` (see vlm.quant.sensitivity).
    """
    linears = quantizable_linears(model)
    all_names = [n for n, _ in model.named_modules()]
    matched = {g: 0 for g, _ in policy.overrides}
    layers: dict[str, LayerPlan] = {}
    sixteen = "fp16" if policy.components.get("language") == "fp16" else "bf16"
    for i, (name, mod) in enumerate(linears.items()):
        comp = family.component_of(name)
        if comp is None:
            prec, reason, comp = sixteen, "outside components", "other"
        else:
            prec, reason = policy.components[comp], "component"
        anc = _ancestors(name)
        for glob, p in policy.overrides:
            if any(fnmatch.fnmatchcase(a, glob) for a in anc):
                prec, reason = p, f"override {glob}"
                matched[glob] += 1
        layers[name] = LayerPlan(name=name, component=comp, out_features=mod.out_features,
                                 in_features=mod.in_features, bias=mod.bias is not None,
                                 precision=prec, base_precision=prec, reason=reason,
                                 group=group_key(name, family), index=i)
    for glob, hits in matched.items():
        if hits == 0:
            close = [n for n in all_names if fnmatch.fnmatchcase(n, glob)]
            hint = (f" (it matches {close[0]!r}, which holds no linear layer)" if close else
                    f"; module names look like {next(iter(linears), '?')!r}")
            raise ConfigError(f"quant.overrides: glob {glob!r} matches no linear layer of this "
                              f"{family.name} model{hint}")
    unknown = set(protected) - set(layers)
    if unknown:
        raise VlmError(f"protected layers not in the model: {sorted(unknown)[:3]}")
    tier_of = protected if isinstance(protected, dict) else dict.fromkeys(protected, sixteen)
    for name, tier in tier_of.items():
        layers[name].precision = INT8W if tier == INT8W else sixteen
        layers[name].reason = "protected"
    if "lm_head" in layers and layers["lm_head"].precision in LOW_BIT and tied_lm_head(model):
        raise ConfigError("quant.lm_head: lm_head shares its weight with the input embeddings "
                          "(tie_word_embeddings); it cannot be stored in "
                          f"{layers['lm_head'].precision} while the embeddings stay 16-bit: set "
                          "lm_head: bf16")
    linear_params = {id(p) for m in linears.values() for p in m.parameters(recurse=False)}
    other = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in linear_params]
    other_params = sum(p.numel() for p in other)
    return QuantPlan(policy=policy, family=family.name, layers=layers, other_params=other_params,
                     other_bytes=other_params * dtype_bytes, analysis=dict(analysis or {}),
                     linear_names=tuple(all_names))
