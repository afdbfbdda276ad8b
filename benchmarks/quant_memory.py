"""Model memory after load under bf16 / nf4 / dynamic, on random-weight full-size VLM shapes.

    python benchmarks/quant_memory.py                     # GPU: Qwen2-VL-2B and Llama-3.2-11B-Vision
    python benchmarks/quant_memory.py --tiny --device cpu # smoke test of this script on CPU
    python benchmarks/quant_memory.py --plan-only         # CPU, seconds: planned bytes from shapes

``--plan-only`` builds each model on the meta device (no weights) and computes, from the shapes,
the bytes of the bf16 / nf4 presets, the ``dynamic`` floor (its 16-bit projector and lm_head, nothing
protected) and its budget's cap, then runs the tiered planner (vlm.quant.sensitivity.choose_tiers)
under the default budget on three made-up error rankings (random; largest layers worst; smallest
layers worst): the planned bytes never exceed the cap, whatever the ranking. Writes
results/quant_memory_plan.{json,md}.

For each model: build the config, initialise random bf16 weights directly on the device, save a
checkpoint, then load it three times through ``vlm.quant.loading.load_quantized`` (the path
``vlm.load(path, quant=...)`` takes) and measure ``torch.cuda.memory_allocated`` after each load
(the model's resident bytes; the dynamic policy's peak while it analyses the 16-bit weights is
reported separately). Calibration for ``dynamic``: two random image-text batches built here (no
tokenizer is needed for random token ids); on random weights the sensitivity ranking says nothing
about accuracy, only the memory figure is meaningful. Writes results/quant_memory.{json,md}.

Published figures (GB as printed, which are GiB: 2.21 G params × 2 B = 4.11 GiB):
    Qwen2-VL-2B             4.11 / 1.36 / 1.81
    Llama-3.2-11B-Vision   19.87 / 6.54 / 7.23
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch



def _importable_vlm() -> None:
    """Make ``vlm`` importable from an uninstalled checkout without putting the repo root on the
    path (its top-level ``kernels/`` folder would shadow Hugging Face's ``kernels`` package)."""
    try:
        import vlm  # noqa: F401  (installed, e.g. pip install -e .)
        return
    except ImportError:
        pass
    link_dir = Path(tempfile.mkdtemp(prefix="vlm_path_"))
    (link_dir / "vlm").symlink_to(Path(__file__).resolve().parents[1] / "vlm")
    sys.path.insert(0, str(link_dir))


_importable_vlm()

PUBLISHED = {"qwen2_vl_2b": {"bf16": 4.11, "nf4": 1.36, "dynamic": 1.81},
             "mllama_11b": {"bf16": 19.87, "nf4": 6.54, "dynamic": 7.23}}
GiB = 2**30


def qwen2_vl_config(tiny: bool, size: str = "2b", *, text_extra: dict | None = None,
                    token_ids: dict | None = None):
    """Qwen2-VL config at the 2B or 7B shapes (random_qwen2_vl.SIZES), or a tiny one.

    ``text_extra``: more text-config values; ``token_ids``: the image/video/vision-start/end ids to
    use instead of the real model's (random_qwen2_vl takes the tiny processor's)."""
    from transformers import Qwen2VLConfig

    from random_qwen2_vl import SIZES

    spec = SIZES[size]
    t = dict(**spec["text"], max_position_embeddings=32768,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    v = dict(depth=32, embed_dim=1280, hidden_size=spec["vision_hidden"], num_heads=16, mlp_ratio=4,
             patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if tiny:
        t.update(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
        v.update(depth=2, embed_dim=64, hidden_size=64, num_heads=4)
    t.update(text_extra or {})
    ids = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653, **(token_ids or {})}
    return Qwen2VLConfig(text_config=t, vision_config=v, tie_word_embeddings=t["tie_word_embeddings"], **ids)


def mllama_config(tiny: bool):
    from transformers import MllamaConfig

    if not tiny:
        return MllamaConfig()   # the defaults are Llama-3.2-11B-Vision's shapes
    return MllamaConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3]),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_global_layers=1, attention_heads=4, image_size=112, patch_size=14,
                           intermediate_layers_indices=[0], vision_output_dim=128))


def qwen2_vl_batches(config, n: int, device: str) -> list[dict]:
    """Random ids around one 224×224 image: 16×16 patches → 64 <|image_pad|> tokens."""
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 16, 16]])
    patch = 3 * 2 * 14 * 14
    out = []
    for _ in range(n):
        ids = torch.cat([torch.randint(0, 151000, (32,), generator=g), torch.tensor([151652]),
                         torch.full((64,), 151655), torch.tensor([151653]),
                         torch.randint(0, 151000, (32,), generator=g)])[None]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "mm_token_type_ids": (ids == 151655).long(),
                    "pixel_values": torch.randn(256, patch, generator=g), "image_grid_thw": grid})
    return out


def mllama_batches(config, n: int, device: str) -> list[dict]:
    """Random ids after one <|image|> token; one image of 2×2 tiles (aspect-ratio id 6)."""
    g = torch.Generator().manual_seed(0)
    vc = config.vision_config
    tiles, size = vc.max_num_tiles, vc.image_size
    out = []
    for _ in range(n):
        ids = torch.cat([torch.tensor([128000, config.image_token_index]),
                         torch.randint(0, 128000, (62,), generator=g)])[None]
        xmask = torch.zeros(1, ids.shape[1], 1, tiles, dtype=torch.long)
        xmask[:, 1:] = 1
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "pixel_values": torch.randn(1, 1, tiles, 3, size, size, generator=g),
                    "aspect_ratio_ids": torch.tensor([[6 if tiles == 4 else 1]]),
                    "aspect_ratio_mask": torch.ones(1, 1, tiles, dtype=torch.long),
                    "cross_attention_mask": xmask})
    return out


MODELS = {"qwen2_vl_2b": (qwen2_vl_config, qwen2_vl_batches),
          "mllama_11b": (mllama_config, mllama_batches)}


def build_checkpoint(name: str, tiny: bool, device: str, root: Path) -> Path:
    from transformers import AutoModelForImageTextToText

    cfg_fn, _ = MODELS[name]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg_fn(tiny), dtype=torch.bfloat16)
    path = root / name
    model.save_pretrained(path)
    del model
    _free()
    return path


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(name: str, path: Path, policy: str, device: str, tiny: bool) -> dict:
    from vlm.families import family_for_config
    from vlm.load import load_config
    from vlm.quant.loading import load_quantized

    config = load_config(path)
    _free()
    base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    t0 = time.perf_counter()
    cal = MODELS[name][1](config, 2, device) if policy == "dynamic" else None
    model = load_quantized(str(path), config=config, family=family_for_config(config), quant=policy,
                           dtype=torch.bfloat16, device=device, calibration=cal)
    seconds = time.perf_counter() - t0
    row = {"model": name, "policy": policy, "load_seconds": round(seconds, 2),
           "footprint_gib": model.get_memory_footprint() / GiB}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        row["allocated_gib"] = (torch.cuda.memory_allocated() - base) / GiB
        row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GiB
    plan = model.vlm_quant_plan
    row["plan_gib"] = plan.total_bytes() / GiB
    row["quantized_by_component"] = plan.count_by_component()
    row["layers_by_component"] = plan.to_json()["counts"]["total"]
    if policy == "dynamic":
        a = plan.analysis
        row["protected"] = plan.to_json()["protected"]
        row["int8w"] = plan.int8w()
        row["budget"] = {k: a.get(k) for k in ("budget", "budget_unit", "budget_limit", "budget_spent",
                                               "candidate_params", "budget_nf4", "tier_counts")}
        row["analysis_timing"] = a.get("timing")
    row["published_gib"] = PUBLISHED[name][policy]
    del model
    _free()
    return row


def plan_bytes(name: str, tiny: bool, policy: str = "dynamic") -> dict:
    """Planned whole-model bytes of ``name`` from its shapes (meta device; see the docstring)."""
    import random

    from vlm.families import family_for_config
    from vlm.quant.loading import meta_model
    from vlm.quant.plan import resolve_plan
    from vlm.quant.policy import INT8W, NF4Multiple, QuantPolicy
    from vlm.quant.sensitivity import candidate_groups, choose_tiers

    config = MODELS[name][0](tiny)
    model = meta_model(config)
    family = family_for_config(config)
    pol = QuantPolicy.parse(policy)
    row = {"model": name, "policy": pol.to_dict()["name"], "budget": str(pol.budget),
           "tiers": list(pol.tiers)}
    for preset in ("bf16", "nf4"):
        row[f"{preset}_gib"] = resolve_plan(QuantPolicy.preset(preset), model, family).total_bytes() / GiB
    base = resolve_plan(pol, model, family)
    row["floor_gib"] = base.total_bytes() / GiB
    if isinstance(pol.budget, NF4Multiple):
        row["cap_gib"] = pol.budget.ratio * base.nf4_preset_bytes() / GiB
    cands, groups = candidate_groups(base)
    size = {g: sum(cands[m].params for m in ms) for g, ms in groups.items()}
    rankings = {"random": lambda g, r: r.random(), "largest worst": lambda g, r: size[g],
                "smallest worst": lambda g, r: 1.0 / size[g]}
    row["planned_gib"] = {}
    for label, fn in rankings.items():
        rng = random.Random(0)
        score = {g: fn(g, rng) for g in groups}
        errors = {m: {"weight_error": score[g], "activation_error": score[g], "block_error": score[g]}
                  for g, ms in groups.items() for m in ms}
        errors8 = {m: dict.fromkeys(e, 0.01 * e["block_error"]) for m, e in errors.items()}
        tiers, a = choose_tiers(base, errors, {INT8W: errors8}, budget=pol.budget, tiers=pol.tiers)
        plan = resolve_plan(pol, model, family, protected=tiers)
        row["planned_gib"][label] = plan.total_bytes() / GiB
        row.setdefault("tier_counts", {})[label] = a["tier_counts"]
    row["published_gib"] = PUBLISHED.get(name, {}).get("dynamic")
    return row


def write_plan(rows: list[dict], out: Path) -> None:
    from vlm.atomic import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quant_memory_plan.json", {"rows": rows}, indent=1)
    lines = ["# Planned bytes from the shapes (GiB; meta device, no weights)", "",
             "`python benchmarks/quant_memory.py --plan-only`. cap = the budget × nf4; planned = the "
             "tiered planner's plan under the policy's budget for three made-up error rankings (the cap "
             "holds whatever the analysis measures); groups per tier in brackets (nf4/int8w/bf16).", "",
             "| model | policy | budget | bf16 | nf4 | floor | cap | planned (random / largest worst / "
             "smallest worst) | published dynamic |", "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        planned = " / ".join(f"{v:.3f} ({'/'.join(str(c) for c in r['tier_counts'][k].values())})"
                             for k, v in r["planned_gib"].items())
        cap = f"{r['cap_gib']:.3f}" if "cap_gib" in r else "-"
        lines.append(f"| {r['model']} | {r['policy']} | {r['budget']} | {r['bf16_gib']:.3f} | "
                     f"{r['nf4_gib']:.3f} | {r['floor_gib']:.3f} | {cap} | {planned} | "
                     f"{r['published_gib'] if r['published_gib'] is not None else '-'} |")
    write_text(out / "quant_memory_plan.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def write(rows: list[dict], out: Path, env: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"env": env, "rows": rows}
    tmp = out / "quant_memory.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / "quant_memory.json")
    key = "allocated_gib" if rows and "allocated_gib" in rows[0] else "footprint_gib"
    lines = ["# Model memory after load (GiB)", "",
             f"{env.get('device')}; torch {env.get('torch')}; transformers {env.get('transformers')}; "
             f"bitsandbytes {env.get('bitsandbytes')}. Random weights, full-size shapes; memory = "
             f"`torch.cuda.memory_allocated()` after `load_quantized` (dynamic: peak while analysing "
             f"in the last column). Published figures beside.", "",
             "| model | policy | measured | planned | published | quantized linears | peak | load s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = ", ".join(f"{c} {n}/{r['layers_by_component'].get(c, 0)}"
                      for c, n in sorted(r["quantized_by_component"].items()))
        lines.append(f"| {r['model']} | {r['policy']} | {r[key]:.3f} | {r['plan_gib']:.3f} | "
                     f"{r['published_gib']:.2f} | {q} | {r.get('peak_gib', float('nan')):.2f} | "
                     f"{r['load_seconds']:.1f} |")
    for r in rows:
        if r["policy"] == "dynamic":
            b = r["budget"]
            cap = b.get("budget_nf4") or {}
            lines += ["", f"**{r['model']} dynamic**: budget {b['budget']} ({b['budget_unit']}"
                          + (f"; cap {cap['cap_bytes'] / GiB:.3f} GiB = {b['budget']} × nf4 "
                             f"{cap['nf4_bytes'] / GiB:.3f} GiB" if cap else "") + f"), groups per tier "
                          f"{b.get('tier_counts')}; analysis {(r.get('analysis_timing') or {}).get('total_s')} s. "
                          f"int8w ({len(r.get('int8w', []))} layers): " + ", ".join(r.get("int8w", [])[:20])
                          + (" ..." if len(r.get("int8w", [])) > 20 else "")
                          + f"; 16-bit ({len(r['protected'])} layers): " + ", ".join(r["protected"][:20])
                          + (" ..." if len(r["protected"]) > 20 else "")]
    tmp = out / "quant_memory.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "quant_memory.md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2_vl_2b,mllama_11b")
    ap.add_argument("--policies", default="bf16,nf4,dynamic")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--plan-only", action="store_true",
                    help="planned bytes from the shapes on the meta device (CPU, seconds; no load)")
    args = ap.parse_args(argv)
    if args.plan_only:
        write_plan([plan_bytes(name, args.tiny) for name in args.models.split(",")], Path(args.out))
        return 0
    import bitsandbytes
    import transformers

    env = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "bitsandbytes": bitsandbytes.__version__, "tiny": args.tiny}
    rows = []
    root = Path(args.workdir or tempfile.mkdtemp(prefix="quant_memory_"))
    for name in args.models.split(","):
        t = time.perf_counter()
        path = build_checkpoint(name, args.tiny, args.device, root)
        print(f"{name}: built and saved in {time.perf_counter() - t:.1f}s", flush=True)
        for pol in args.policies.split(","):
            row = measure(name, path, pol, args.device, args.tiny)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "protected"}), flush=True)
            write(rows, Path(args.out), env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
