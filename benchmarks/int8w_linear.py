"""The int8w tier's layer against a 16-bit linear and bitsandbytes NF4, side by side, same inputs.

Per layer shape (Qwen2-VL-7B's: MLP gate/up 3584→18944, down 18944→3584, attention 3584→3584),
a frozen layer with the input requiring grad (what LoRA training does to a base layer):
forward + backward time (median of --iters after warm-up), peak memory above the inputs, stored
weight bytes, and the output error against the 16-bit layer, ‖y − y₁₆‖/‖y₁₆‖.

    python benchmarks/int8w_linear.py --device cuda --out benchmarks/results/int8w_linear   # GPU
    python benchmarks/int8w_linear.py --tiny --device cpu --out DIR                          # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

SHAPES = {"mlp.up (3584→18944)": (3584, 18944), "mlp.down (18944→3584)": (18944, 3584),
          "attn.o (3584→3584)": (3584, 3584)}
TINY_SHAPES = {"tiny (64→96)": (64, 96)}


def _layers(lin16: torch.nn.Linear, device: str) -> dict[str, torch.nn.Module]:
    from vlm.quant.int8_linear import Int8Linear

    out = {"bf16 nn.Linear": lin16, "int8w Int8Linear": Int8Linear.from_linear(lin16)}
    try:
        import bitsandbytes as bnb
    except ImportError:
        return out
    q = bnb.nn.Linear4bit(lin16.in_features, lin16.out_features, bias=False, compute_dtype=lin16.weight.dtype,
                          quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin16.weight.data.float().cpu(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    out["nf4 bnb Linear4bit"] = q.to(device)
    if device == "cpu":
        from vlm.quant.cpu_path import use_portable_cpu_path

        use_portable_cpu_path(out["nf4 bnb Linear4bit"])
    return out


def _stored_bytes(mod) -> int:
    seen, total = set(), 0
    for t in list(mod.parameters()) + list(mod.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    qs = getattr(getattr(mod, "weight", None), "quant_state", None)
    if qs is not None:                      # NF4 absmax (and its nested state) live beside the weight
        for t in (qs.absmax, getattr(getattr(qs, "state2", None), "absmax", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def _step(mod, x, grad):
    x.grad = None
    y = mod(x)
    y.backward(grad)
    return y


def run(args) -> dict:
    device, dtype = args.device, torch.bfloat16
    shapes = TINY_SHAPES if args.tiny else SHAPES
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for label, (fan_in, fan_out) in shapes.items():
        torch.manual_seed(0)
        lin16 = torch.nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(args.tokens, fan_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(args.tokens, fan_out, device=device, dtype=dtype)
        with torch.no_grad():
            ref = lin16(x).float()
        for name, mod in _layers(lin16, device).items():
            for _ in range(2):
                _step(mod, x, grad)
            sync()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                y = _step(mod, x, grad)
                sync()
                times.append(time.perf_counter() - t)
            peak = (torch.cuda.max_memory_allocated() - base) if device.startswith("cuda") else None
            err = float((y.detach().float() - ref).norm() / ref.norm())
            rows.append({"shape": label, "layer": name, "ms": 1e3 * statistics.median(times),
                         "peak_MiB": None if peak is None else peak / 2**20,
                         "weight_MiB": _stored_bytes(mod) / 2**20, "rel_error_vs_bf16": err})
    return {"device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
            "tokens": args.tokens, "iters": args.iters, "rows": rows}


def markdown(rep: dict) -> str:
    lines = [f"{rep['device']}, {rep['tokens']} tokens, bf16, forward + input-gradient backward, "
             f"median of {rep['iters']}", "",
             "| shape | layer | ms | × bf16 | peak MiB | weight MiB | rel. error vs bf16 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = {r["shape"]: r["ms"] for r in rep["rows"] if r["layer"].startswith("bf16")}
    for r in rep["rows"]:
        peak = "-" if r["peak_MiB"] is None else f"{r['peak_MiB']:.1f}"
        lines.append(f"| {r['shape']} | {r['layer']} | {r['ms']:.3f} | {r['ms'] / base[r['shape']]:.2f} | "
                     f"{peak} | {r['weight_MiB']:.2f} | {r['rel_error_vs_bf16']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="smoke run: one small shape, 64 tokens, 3 iterations")
    args = ap.parse_args(argv)
    if args.tiny:
        args.tokens, args.iters = 64, 3
    if args.device == "cpu":
        torch.set_num_threads(1)
    rep = run(args)
    from vlm.atomic import write_json, write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "int8w_linear.json", rep, indent=1)
    md = markdown(rep)
    write_text(out / "int8w_linear.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
