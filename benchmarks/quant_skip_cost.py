"""Load-time cost of a quantization plan's skip list, at Qwen2-VL-7B's module names (CPU, no weights).

transformers' bitsandbytes load (``integrations.bitsandbytes.replace_with_bnb_linear``) asks, for
every module name, ``should_convert_module(name, keys)``: ``re.match(key + "\\.", name) or
re.match(key, name) or name.endswith(key)`` for each key. With one key per kept layer that is
2 × (keys) regex calls per module, and past Python's regex cache (512 patterns) a compile each:
issue 16 measured 62 s for a 7B ``dynamic`` plan. This script runs, side by side in one process on a
meta-device Qwen2-VL-7B (config only):

    explicit   the key list config.json keeps (plan.skip_modules() + vLLM's names), as loading
               passed it before
    merged     plan.skip_pattern(): the kept layers as ONE trie regex (what loading passes now)

for two plans: ``dynamic`` at its default budget and tiers (errors drawn at random, seeded: the analysis
itself is not what is timed) and the usual skip list (vision tower + projector + lm_head kept).
Per row: seconds in transformers' replace_with_bnb_linear, re.match calls and regex compiles it
made, and that both key forms convert exactly the same modules. Also times building the saved
list (plan.skip_modules), against the pairwise check it replaced.

    python benchmarks/quant_skip_cost.py --out benchmarks/results/quant_skip_cost.json
    python benchmarks/quant_skip_cost.py --tiny --out /tmp/x.json      # smoke (tiny shapes)
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import torch


def _meta(config):
    from vlm.quant.loading import meta_model

    return meta_model(config, torch.bfloat16)


def _convert(config, keys: list[str]) -> tuple[float, dict, set[str]]:
    """Seconds, regex counts and the converted module names for transformers' replacement."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations import bitsandbytes as hf_bnb
    from transformers.quantizers import quantizers_utils

    model = _meta(config)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=keys)
    counts = {"match": 0}
    real = quantizers_utils.re.match

    def counting_match(p, s, flags=0):
        counts["match"] += 1
        return real(p, s, flags)

    re.purge()
    compiles_before = _compile_count()
    quantizers_utils.re.match = counting_match
    try:
        t0 = time.perf_counter()
        with torch.device("meta"):
            hf_bnb.replace_with_bnb_linear(model, modules_to_not_convert=list(keys), quantization_config=qc)
        seconds = time.perf_counter() - t0
    finally:
        quantizers_utils.re.match = real
    counts["compiles"] = _compile_count() - compiles_before
    converted = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return seconds, counts, converted


_COMPILES = [0]


def _compile_count() -> int:
    return _COMPILES[0]


def _install_compile_counter() -> None:
    compiler = re._compiler             # re._compile calls _compiler.compile on a cache miss (3.11+)
    real = compiler.compile

    def counting(p, flags=0):
        _COMPILES[0] += 1
        return real(p, flags)

    compiler.compile = counting


def _pairwise_skip_modules(plan) -> list[str]:
    """The saved-list construction before this change: transformers' test for every (kept, name)
    pair (kept for timing only)."""
    from vlm.quant.plan import _hf_skip_matches

    names = list(plan.linear_names)
    return [re.escape(n) + "$" if any(m != n and _hf_skip_matches(n, m) for m in names) else n
            for n in plan.kept()]


def plans(config, family, budget=None):
    """``budget``: the dynamic policy's (None: its default, 1.08x; the tiny smoke run passes a
    fraction, since a tiny model's embeddings make 1.08x of its NF4 bytes hold every layer)."""
    from vlm.quant.plan import resolve_plan
    from vlm.quant.policy import QuantPolicy
    from vlm.quant.sensitivity import choose_tiers

    model = _meta(config)
    dyn = QuantPolicy.parse("dynamic", budget=budget)
    base = resolve_plan(dyn, model, family)
    rng = random.Random(0)
    errors = {n: {"weight_error": rng.uniform(0.05, 0.15), "activation_error": rng.uniform(0.05, 0.3),
                  "block_error": rng.lognormvariate(-9, 1.5)}
              for n, lp in base.layers.items() if lp.reason == "component" and lp.precision == "nf4"}
    int8w = {n: {k: v / 300 for k, v in e.items()} for n, e in errors.items()}
    protected, analysis = choose_tiers(base, errors, {"int8w": int8w}, budget=dyn.budget, tiers=dyn.tiers)
    skip = QuantPolicy.parse({"preset": "nf4", "vision": "bf16", "projector": "bf16"})
    return {"dynamic (default budget)": resolve_plan(dyn, model, family, protected=protected,
                                                     analysis=analysis),
            "skip-list (vision+projector+lm_head)": resolve_plan(skip, model, family)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="7b", choices=("2b", "7b"))
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from quant_memory import qwen2_vl_config

    from vlm.atomic import write_json
    from vlm.families import family_for_config
    from vlm.quant.loading import bnb_config

    _install_compile_counter()
    config = qwen2_vl_config(args.tiny, args.size)
    family = family_for_config(config)
    rows = []
    for label, plan in plans(config, family, 0.1 if args.tiny else None).items():
        t0 = time.perf_counter()
        old_saved = _pairwise_skip_modules(plan)
        pairwise_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        saved = plan.skip_modules()
        scan_s = time.perf_counter() - t0
        assert saved == old_saved, "the scan and the pairwise check disagree"
        explicit = bnb_config(plan, torch.bfloat16).llm_int8_skip_modules
        merged = plan.skip_pattern()
        row = {"plan": label, "modules": len(plan.linear_names), "kept_layers": len(plan.kept()),
               "quantized_layers": len(plan.quantized()), "explicit_keys": len(explicit),
               "saved_list_seconds": {"pairwise (before)": round(pairwise_s, 3),
                                      "one scan per key (now)": round(scan_s, 4)}}
        converted = {}
        for form, keys in (("explicit", explicit), ("merged", merged)):
            seconds, counts, converted[form] = _convert(config, keys)
            row[form] = {"seconds": round(seconds, 3), "re_match_calls": counts["match"],
                         "regex_compiles": counts["compiles"], "keys": len(keys)}
        row["same_modules_converted"] = converted["explicit"] == converted["merged"] == set(plan.quantized())
        row["speedup"] = round(row["explicit"]["seconds"] / max(row["merged"]["seconds"], 1e-9), 1)
        rows.append(row)
        print(f"{label}: {row['modules']} modules, {row['kept_layers']} kept | explicit "
              f"{row['explicit']['keys']} keys {row['explicit']['seconds']:.2f} s "
              f"({row['explicit']['re_match_calls']:,} re.match, {row['explicit']['regex_compiles']:,} "
              f"compiles) | merged {row['merged']['seconds']:.3f} s "
              f"({row['merged']['re_match_calls']:,} re.match, {row['merged']['regex_compiles']} "
              f"compiles) | same modules: {row['same_modules_converted']} | saved list: pairwise "
              f"{pairwise_s:.2f} s, scan {scan_s:.3f} s", flush=True)
    write_json(Path(args.out), {"model": f"qwen2_vl_{'tiny' if args.tiny else args.size} (meta device)",
                                "rows": rows}, indent=1)
    return 0 if all(r["same_modules_converted"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
