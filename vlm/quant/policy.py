"""QuantPolicy: which precision each part of a VLM is stored in.

A policy names a precision per component (``vision``, ``projector``, ``language``, ``lm_head``,
``embeddings``), optional overrides by module-name glob, the NF4 double-quantization flag, and, for
``dynamic`` policies, a protection budget for the sensitivity analysis (vlm.quant.sensitivity).

Precisions: ``bf16`` / ``fp16`` (not quantized: kept in the model's load dtype), ``int8``
(bitsandbytes LLM.int8), ``nf4`` / ``fp4`` (bitsandbytes 4-bit, blocks of 64), ``int8w`` (this
project's weight-only int8, one scale per output channel, vlm.quant.int8_linear: it may sit beside
nf4/fp4/int8 in one model, since transformers loads those layers 16-bit and vlm swaps them after). Embeddings are
``nn.Embedding`` and stay 16-bit (bitsandbytes' transformers integration quantizes linears only).

Presets:
    bf16     nothing quantized.
    nf4      every quantizable linear in NF4 (vision, projector, language), double quantization;
             lm_head 16-bit as in transformers' standard ``load_in_4bit`` (the "standard 4-bit").
    dynamic  lm_head 16-bit; vision, projector and language NF4 with double quantization (the
             projector is measured like every other candidate, not pinned: pinned 16-bit, it
             alone took 1.16 × the demo base's NF4 bytes). The sensitivity analysis
             (vlm.quant.sensitivity) measures what quantizing each layer does to the model (by
             default the error it propagates three blocks down the residual stream, relative to
             it, vlm.quant.propagated; or the KL of the next-token distribution against 16-bit;
             in float32), stored NF4 and stored int8w, and chooses per group among nf4 / int8w /
             bf16 (``tiers: [int8w, bf16]``): outliers first, then by measured error removed per
             extra byte (vlm.quant.sensitivity.choose_tiers), while the whole model stays within
             ``budget: 1.08x``, 1.08 × the bytes of the same model under the ``nf4`` preset (the
             standard 4-bit load; before protection both plans weigh the same). The cap holds
             whatever the analysis measures: Llama-3.2-11B-Vision plans ≤ 7.17 GiB (NF4 6.64,
             published dynamic 7.23), Qwen2-VL-2B ≤ 1.50 GiB (benchmarks/quant_memory.py
             --plan-only). ``tiers: [bf16]`` is the earlier 16-bit-only protection.

A policy is given as a preset name, a dict (``preset:`` plus keys that change it), a YAML path, or
a ``QuantPolicy``. A dict that names one quantized type for some components (``vision: fp4``)
gives it to the preset's other quantized components too (one checkpoint holds one type).
Example YAML (the ``quant:`` block of a recipe, or a file of its own)::

    preset: dynamic
    budget: 1.08x           # whole model ≤ 1.08 × its nf4-preset bytes (the default); or a
                            # fraction of the quantizable parameters kept 16-bit (0.05; with
                            # int8w: the same bytes), or extra bytes: 300000000 / "300MB"
    metric: propagated      # ranking: propagated (residual-stream error, default; 4 blocks per
                            # group) / output (next-token KL; a whole-model forward per group)
                            # / activation / weight error
    propagate: 3            # propagated metric: measured this many blocks past the layer's own
                            # (0: its block only, fastest), or "end": at the end of its stack
    analysis_dtype: fp32    # fp32 (default: the same plan on any CPU or GPU) or model (load dtype)
    tiers: [int8w, bf16]    # protection tiers (the default); [bf16]: 16-bit only. int8w costs
                            # ~1/3 of bf16's extra bytes
    overrides:
      "model.language_model.layers.0.*": bf16
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vlm.errors import ConfigError
from vlm.families.base import COMPONENTS

PRECISIONS = ("bf16", "fp16", "int8", "nf4", "fp4", "int8w")
SIXTEEN_BIT = ("bf16", "fp16")
FOUR_BIT = ("nf4", "fp4")
QUANTIZED = ("int8", "nf4", "fp4")          # bitsandbytes storage types (one per checkpoint)
INT8W = "int8w"                             # vlm.quant.int8_linear: beside any of them
LOW_BIT = QUANTIZED + (INT8W,)              # every precision stored below 16 bits
TIERS = ("int8w", "bf16")                   # what the dynamic analysis may protect a layer in
METRICS = ("propagated", "output", "activation", "weight")
ANALYSIS_DTYPES = ("fp32", "model")
DEFAULT_BUDGET = 0.10      # the static presets' field (unused there); dynamic's is DYNAMIC_BUDGET
DYNAMIC_BUDGET = "1.08x"   # the dynamic preset: whole model ≤ 1.08 × its NF4 bytes (NF4Multiple)
DEFAULT_PROPAGATE = 3     # propagated metric: blocks measured past the layer's own (vlm.quant.propagated)

_PRESETS: dict[str, dict[str, Any]] = {
    "bf16": {"components": {c: "bf16" for c in COMPONENTS}, "double_quant": False,
             "sensitivity": False},
    "nf4": {"components": {"vision": "nf4", "projector": "nf4", "language": "nf4",
                           "lm_head": "bf16", "embeddings": "bf16"},
            "double_quant": True, "sensitivity": False},
    "dynamic": {"components": {"vision": "nf4", "projector": "nf4", "language": "nf4",
                               "lm_head": "bf16", "embeddings": "bf16"},
                "double_quant": True, "sensitivity": True,
                # int8w + bf16 closes far more of the KL gap than 16-bit-only protection at equal
                # bytes (benchmarks/results/quant_policies_*); the NF4-relative cap bounds the
                # whole model's bytes by construction (see NF4Multiple)
                "tiers": ("int8w", "bf16"), "budget": DYNAMIC_BUDGET},
}
PRESETS = tuple(_PRESETS)

_KEYS = ("preset", "components", *COMPONENTS, "overrides", "double_quant", "dynamic", "sensitivity",
         "budget", "metric", "propagate", "seed", "calibration_samples", "max_rows", "analysis_dtype",
         "tiers")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def _closest(value: str, valid: tuple[str, ...] | list[str]) -> str:
    m = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.5)
    return f"; did you mean {m[0]!r}?" if m else ""


def _check_precision(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.lower() not in PRECISIONS:
        raise ConfigError(f"quant.{where}: unknown precision {value!r}; allowed: "
                          f"{', '.join(PRECISIONS)}{_closest(str(value).lower(), PRECISIONS)}")
    return value.lower()


@dataclass(frozen=True)
class NF4Multiple:
    """Budget ``r``x: the whole planned model holds at most r × the bytes the ``nf4`` preset
    stores it in (every vision/projector/language linear NF4 with double quantization, lm_head and
    embeddings 16-bit: transformers' standard 4-bit load). The analysis may spend
        B = r · bytes_nf4 − bytes_floor
    extra bytes, bytes_floor being the policy's plan before protection (``dynamic``: its 16-bit
    projector and lm_head included), so bytes_plan ≤ bytes_floor + B = r · bytes_nf4 whatever it
    measures (B < 0, a floor above the cap: nothing is protected and the analysis says so)."""

    ratio: float

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and 1.0 <= self.ratio <= 16.0):
            raise ConfigError(f"quant.budget: {self.ratio!r}x is not a multiple of the NF4 bytes ≥ 1 "
                              f"(e.g. '1.08x'; the NF4 model itself is 1x)")

    def __str__(self) -> str:
        return f"{self.ratio:g}x"


def parse_budget(value: Any) -> float | int | NF4Multiple:
    """Budget as a fraction in [0, 1] (a float), a number of bytes (an int, or "300MB", "1.5GiB"),
    or a multiple of the NF4 model's bytes ("1.08x", ``NF4Multiple``).

    Fraction f: the protected layers hold at most f × (parameters the policy may quantize); with
    ``tiers: [int8w, ...]`` the bytes that protecting f of them in 16-bit costs.
    Bytes B: protecting costs at most B extra bytes (their bytes minus their quantized bytes).
    r x: the whole model ≤ r × its bytes under the ``nf4`` preset (see NF4Multiple).
    """
    if isinstance(value, NF4Multiple):
        return value
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"quant.budget: {value!r} is not a fraction in [0, 1], a byte count or a "
                          f"multiple of the NF4 bytes ('1.08x')")
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*[xX×]\s*(nf4)?\s*", value, re.I):
        return NF4Multiple(float(re.match(r"\s*([0-9]*\.?[0-9]+)", value).group(1)))
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"quant.budget: cannot read {value!r}; give a fraction (0.1), bytes "
                              f"(300000000, '300MB', '1.5GiB') or a multiple of the NF4 bytes ('1.08x')")
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit == "" and "." in m.group(1):
            return parse_budget(number)
        return parse_budget(int(number * _UNITS[unit]))
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"quant.budget: fraction {value} is out of range [0, 1] (bytes are "
                              f"written as an integer or with a unit, e.g. '300MB'; a multiple of the "
                              f"NF4 bytes with an x, e.g. '{value:g}x')")
        return float(value)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"quant.budget: {value} bytes is negative")
        return int(value)
    raise ConfigError(f"quant.budget: {value!r} is not a fraction in [0, 1], a byte count or a "
                      f"multiple of the NF4 bytes ('1.08x')")


@dataclass(frozen=True)
class QuantPolicy:
    """A resolved-by-name (not yet by model) quantization policy; see the module docstring."""

    components: Mapping[str, str]
    overrides: tuple[tuple[str, str], ...] = ()     # (glob, precision); later entries win
    double_quant: bool = True
    sensitivity: bool = False                       # run the dynamic analysis
    budget: float | int | NF4Multiple = DEFAULT_BUDGET   # fraction / extra bytes / × nf4 bytes
    metric: str = "propagated"                      # propagated / output (KL) / activation / weight
    propagate: str | int = DEFAULT_PROPAGATE        # propagated metric: k blocks further / "end"
    analysis_dtype: str = "fp32"                    # fp32: same plan on any machine; model: load dtype
    seed: int = 0
    calibration_samples: int = 4
    max_rows: int = 256                             # calibration rows kept per layer
    name: str = "custom"
    tiers: tuple[str, ...] = ("bf16",)              # protection tiers of the dynamic analysis

    def __post_init__(self):
        comps = dict(self.components)
        for c in comps:
            if c not in COMPONENTS:
                raise ConfigError(f"quant: unknown component {c!r}; components: "
                                  f"{', '.join(COMPONENTS)}{_closest(c, COMPONENTS)}")
        missing = [c for c in COMPONENTS if c not in comps]
        if missing:
            raise ConfigError(f"quant: no precision for component(s) {', '.join(missing)}")
        for c, p in comps.items():
            comps[c] = _check_precision(p, c)
        if comps["embeddings"] not in SIXTEEN_BIT:
            raise ConfigError(f"quant.embeddings: {comps['embeddings']!r} is not possible: "
                              f"embeddings stay 16-bit (bf16 or fp16); bitsandbytes quantizes "
                              f"linear layers only")
        object.__setattr__(self, "components", comps)
        ov = []
        for glob, p in self.overrides:
            if not isinstance(glob, str) or not glob:
                raise ConfigError(f"quant.overrides: {glob!r} is not a module-name glob")
            ov.append((glob, _check_precision(p, f"overrides[{glob!r}]")))
        object.__setattr__(self, "overrides", tuple(ov))
        kinds = {p for p in list(comps.values()) + [p for _, p in ov] if p in QUANTIZED}
        if len(kinds) > 1:
            raise ConfigError(
                f"quant: the policy mixes {' and '.join(sorted(kinds))}; one checkpoint holds one "
                f"bitsandbytes storage type (its BitsAndBytesConfig), so plain from_pretrained could "
                f"not load it back. Use one of int8/nf4/fp4 beside bf16/fp16")
        if self.metric not in METRICS:
            raise ConfigError(f"quant.metric: {self.metric!r} is not one of {', '.join(METRICS)}")
        if not (self.propagate == "end" or (isinstance(self.propagate, int)
                                            and not isinstance(self.propagate, bool)
                                            and self.propagate >= 0)):
            raise ConfigError(f"quant.propagate: {self.propagate!r} must be 'end' or an integer ≥ 0 "
                              f"(blocks measured past the layer's own)")
        if self.analysis_dtype not in ANALYSIS_DTYPES:
            raise ConfigError(f"quant.analysis_dtype: {self.analysis_dtype!r} is not one of "
                              f"{', '.join(ANALYSIS_DTYPES)}")
        object.__setattr__(self, "budget", parse_budget(self.budget))
        tiers = (self.tiers,) if isinstance(self.tiers, str) else self.tiers
        if (not isinstance(tiers, (list, tuple)) or not tiers
                or any(not isinstance(t, str) or t not in TIERS for t in tiers)):
            raise ConfigError(f"quant.tiers: {self.tiers!r} must be a list of protection tiers "
                              f"from {', '.join(TIERS)} (e.g. [int8w, bf16])")
        object.__setattr__(self, "tiers", tuple(sorted(set(tiers), key=TIERS.index)))
        for key in ("seed", "calibration_samples", "max_rows"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1):
                raise ConfigError(f"quant.{key}: {v!r} must be an integer ≥ {0 if key == 'seed' else 1}")
        for key in ("double_quant", "sensitivity"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"quant.{key}: {getattr(self, key)!r} must be true or false")

    # -- queries -------------------------------------------------------------------------------
    @property
    def propagate_blocks(self) -> int | None:
        """``propagate`` as vlm.quant.propagated takes it: None = to the end of the stack."""
        return None if self.propagate == "end" else int(self.propagate)

    @property
    def quant_kind(self) -> str | None:
        """The one quantized storage type the policy uses (nf4/fp4/int8), or None."""
        for p in list(self.components.values()) + [p for _, p in self.overrides]:
            if p in QUANTIZED:
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that ``QuantPolicy.parse`` reads back (saved in checkpoints)."""
        return {"name": self.name, "components": dict(self.components),
                "overrides": {g: p for g, p in self.overrides}, "double_quant": self.double_quant,
                "dynamic": self.sensitivity,
                "budget": str(self.budget) if isinstance(self.budget, NF4Multiple) else self.budget,
                "metric": self.metric,
                "propagate": self.propagate,
                "seed": self.seed, "calibration_samples": self.calibration_samples,
                "max_rows": self.max_rows, "analysis_dtype": self.analysis_dtype,
                "tiers": list(self.tiers)}

    def replace(self, **changes) -> "QuantPolicy":
        return dataclasses.replace(self, **changes)

    # -- parsing -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "QuantPolicy":
        if name not in _PRESETS:
            raise ConfigError(f"quant: unknown preset {name!r}; presets: {', '.join(PRESETS)}"
                              f"{_closest(name, PRESETS)} (or give a YAML path / dict)")
        p = _PRESETS[name]
        return cls(components=dict(p["components"]), double_quant=p["double_quant"],
                   sensitivity=p["sensitivity"], tiers=p.get("tiers", ("bf16",)),
                   budget=p.get("budget", DEFAULT_BUDGET), name=name)

    @classmethod
    def parse(cls, spec: Any, *, budget: Any = None) -> "QuantPolicy":
        """A preset name, a dict, a YAML path or a QuantPolicy → QuantPolicy (``budget`` overrides)."""
        if isinstance(spec, QuantPolicy):
            pol = spec
        elif isinstance(spec, (str, os.PathLike)) and str(spec) in _PRESETS:
            pol = cls.preset(str(spec))
        elif isinstance(spec, (str, os.PathLike)):
            path = Path(spec)
            if not (path.suffix in (".yaml", ".yml", ".json") or path.exists()):
                cls.preset(str(spec))  # raises the unknown-preset error
            pol = cls.from_file(path)
        elif isinstance(spec, Mapping):
            pol = cls.from_dict(spec)
        elif spec is None:
            pol = cls.preset("bf16")
        else:
            raise ConfigError(f"quant: expected a preset name, dict, YAML path or QuantPolicy, "
                              f"got {type(spec).__name__}")
        if budget is not None:
            pol = pol.replace(budget=parse_budget(budget))
        return pol

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "QuantPolicy":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"quant: policy file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"quant: {path} is not valid YAML: {e}") from e
        if isinstance(data, Mapping) and "quant" in data and len(data) == 1:
            data = data["quant"]
        if isinstance(data, str):
            return cls.parse(data)
        if not isinstance(data, Mapping):
            raise ConfigError(f"quant: {path} must hold a mapping (or a preset name)")
        try:
            return cls.from_dict(data, name=path.stem)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> "QuantPolicy":
        for k in data:
            if k not in _KEYS and k != "name":
                raise ConfigError(f"quant: unknown key {k!r}{_closest(str(k), _KEYS) or '; keys: ' + ', '.join(_KEYS)}")
        preset = data.get("preset", "bf16" if "preset" not in data and not data.get("dynamic") else "dynamic")
        base = cls.preset(preset).to_dict()
        comps = dict(base["components"])
        nested = data.get("components") or {}
        if not isinstance(nested, Mapping):
            raise ConfigError("quant.components: expected a mapping component -> precision")
        for c, p in list(nested.items()) + [(c, data[c]) for c in COMPONENTS if c in data]:
            if c not in COMPONENTS:
                raise ConfigError(f"quant: unknown component {c!r}; components: "
                                  f"{', '.join(COMPONENTS)}{_closest(str(c), COMPONENTS)}")
            comps[c] = p
        named = [c for c, _ in nested.items()] + [c for c in COMPONENTS if c in data]
        kinds = {str(comps[c]).lower() for c in named} & set(QUANTIZED)
        if len(kinds) == 1:
            # one checkpoint holds one bitsandbytes type: the preset's other quantized components
            # take the one the config names ({preset: dynamic, vision: fp4, language: fp4} stores
            # the projector, a dynamic candidate, in fp4 too)
            kind = kinds.pop()
            for c in COMPONENTS:
                if c not in named and comps[c] in QUANTIZED:
                    comps[c] = kind
        raw_ov = data.get("overrides") or {}
        if isinstance(raw_ov, Mapping):
            overrides = tuple((str(g), p) for g, p in raw_ov.items())
        elif isinstance(raw_ov, list):
            overrides = []
            for i, item in enumerate(raw_ov):
                if not (isinstance(item, Mapping) and set(item) == {"glob", "precision"}):
                    raise ConfigError(f"quant.overrides[{i}]: expected {{glob: ..., precision: ...}}")
                overrides.append((str(item["glob"]), item["precision"]))
            overrides = tuple(overrides)
        else:
            raise ConfigError("quant.overrides: expected a mapping glob -> precision")
        sens = data.get("dynamic", data.get("sensitivity", base["dynamic"]))
        return cls(components=comps, overrides=overrides,
                   double_quant=data.get("double_quant", base["double_quant"]),
                   sensitivity=sens, budget=data.get("budget", base["budget"]),
                   metric=data.get("metric", "propagated"), propagate=data.get("propagate", DEFAULT_PROPAGATE),
                   seed=data.get("seed", 0),
                   analysis_dtype=data.get("analysis_dtype", "fp32"),
                   calibration_samples=data.get("calibration_samples", 4),
                   max_rows=data.get("max_rows", 256),
                   tiers=tuple(data["tiers"]) if isinstance(data.get("tiers"), list) else data.get("tiers", base["tiers"]),
                   name=str(data.get("name", name or preset)))


def load_policy(spec: Any, *, budget: Any = None) -> QuantPolicy:
    """Shorthand for ``QuantPolicy.parse``."""
    return QuantPolicy.parse(spec, budget=budget)
