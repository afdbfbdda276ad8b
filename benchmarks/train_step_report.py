"""Markdown table and target checks for benchmarks/train_step.py results."""

from __future__ import annotations

from train_step_variants import VARIANTS


def markdown(data: dict) -> str:
    env, cfg, fl, rows = data["env"], data["config"], data["flops"], data["rows"]
    peak = data.get("matmul_tflops")
    base = next((r for r in rows if r.get("variant") == "a" and "error" not in r), None)
    L = [f"# Training step on W ({cfg['model']}), {env['gpu']}", "",
         f"{env['gpu']}, driver {env.get('driver')}; torch {env['torch']} (CUDA {env['cuda']}), "
         f"transformers {env['transformers']}, peft {env['peft']}, triton {env['triton']}, "
         f"bitsandbytes {env['bitsandbytes']}, liger-kernel {env['liger_kernel']}; commit {env.get('git')}.",
         "",
         f"W: batch {cfg['batch']} × {cfg['seq']} tokens, one image each ("
         + (f"grid {cfg['grid']}: " if "grid" in cfg else f"{cfg.get('image_px')} px: ") +
         f"{cfg['patches'] // cfg['batch']} patches → {cfg['image_tokens']} image tokens), labels on the "
         f"{cfg['label_tokens']} text tokens; LoRA r=16 α=16 on q,k,v,o,gate,up,down (language); "
         f"vision frozen; AdamW lr 2e-4 (torch fused); bf16 weights + bf16 autocast. "
         f"{cfg['warmup']} warm-up steps, median of {cfg['steps']} timed steps, each variant in its "
         f"own process, all in one invocation.",
         "",
         f"MFU = (4·N_LM·T + 2·N_vis·P) / step time / {peak:.0f} TFLOP/s (bf16 8192³ matmul measured in "
         f"this run); N_LM = {fl['N_LM'] / 1e9:.3f} G (lm_head included), T = {fl['tokens']}, N_vis = "
         f"{fl['N_vis_per_patch'] / 1e9:.3f} G per patch, P = {fl['patches']}: "
         f"{fl['model_flops'] / 1e12:.1f} TFLOP of model work per step. Recompute (not in MFU): "
         f"gradient checkpointing adds {fl['recompute_lm_flops'] / 1e12:.1f} TFLOP (another LM forward); "
         f"HF's recipe also recomputes and back-propagates the frozen tower "
         f"(+{fl['vision_bwd_recompute_flops'] / 1e12:.1f} TFLOP)." if peak else "",
         "",
         "| variant | step ms (median) | tokens/s | × (a) | peak alloc GiB | × (a) | peak reserved GiB | "
         "host offload GiB | first-step loss | rel. Δ vs (a) | MFU | fwd/bwd/opt ms | cold: ready s / 1st step s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['variant']} {VARIANTS.get(r['variant'], '')} | failed: {r['error']} |" + " |" * 11)
            continue
        sp = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        mem = r.get("peak_alloc_gib", float("nan"))
        mr = mem / base["peak_alloc_gib"] if base and "peak_alloc_gib" in base else float("nan")
        dl = abs(r["first_step_loss"] - base["first_step_loss"]) / abs(base["first_step_loss"]) if base else 0
        mfu = fl["model_flops"] / r["step_s_median"] / (peak * 1e12) if peak else float("nan")
        f, b, o = r["fwd_bwd_opt_ms_median"]
        L.append(f"| {r['variant']}: {r['label']} | {r['step_s_median'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} | "
                 f"{sp:.2f} | {mem:.2f} | {mr:.2f} | {r.get('peak_reserved_gib', float('nan')):.2f} | "
                 f"{r['host_offload_gib']:.1f} | {r['first_step_loss']:.5f} | {dl:.1e} | {mfu:.1%} | "
                 f"{f:.0f}/{b:.0f}/{o:.0f} | {r['process_ready_s']:.1f} / {r['first_step_s']:.2f} |")
    L += ["", "Targets (same-run ratios):", ""]
    for t in data.get("targets", []):
        L.append(f"- {t['what']}: measured {t['measured']}; target {t['target']} → "
                 f"**{'met' if t['met'] else 'NOT met'}**")
    if cfg.get("note"):
        L += ["", cfg["note"]]
    return "\n".join(L) + "\n"


def targets(rows: list[dict], fl: dict, peak: float | None) -> list[dict]:
    by = {r["variant"]: r for r in rows if "error" not in r}
    out = []
    a = by.get("a")
    if not a:
        return out

    def add(what, val, target, ok, fmt="{:.2f}×"):
        out.append({"what": what, "measured": fmt.format(val), "target": target, "met": bool(ok)})

    # the targets for vlmtune's defaults (d, e) and, where measured, for the CUDA-graph configuration
    # (training.cuda_graphs: true, mlp_chunks: 2 = d_ro_mlp2, e_ro_mlp2)
    for suffix in ("", "_ro_mlp2"):
        for v, want in (("d", 3.0), ("e", 2.5)):
            if v + suffix in by:
                x = by[v + suffix]["tokens_per_s"] / a["tokens_per_s"]
                add(f"({v + suffix}) tokens/s vs (a)", x, f"≥ {want}×", x >= want)
        if "peak_alloc_gib" in a:
            for v, want in (("e", 0.25), ("d", 0.45)):
                if v + suffix in by:
                    x = by[v + suffix]["peak_alloc_gib"] / a["peak_alloc_gib"]
                    add(f"({v + suffix}) peak GPU memory vs (a) (no offload in any variant)", x, f"≤ {want}×",
                        x <= want)
        if "d" + suffix in by and peak:
            m = fl["model_flops"] / by["d" + suffix]["step_s_median"] / (peak * 1e12)
            add(f"(d{suffix}) MFU", m * 100, "≥ 30%", m >= 0.30, "{:.1f}%")
    return out
