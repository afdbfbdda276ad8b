"""Which `vlm train` setups replay CUDA graphs (`training.cuda_graphs: true`) without torch's liveness error.

    python3 benchmarks/cuda_graphs_repro.py                  # on the GPU, every variant, < ~90 s
    python3 benchmarks/cuda_graphs_repro.py --variants shipped,no_mark
    python3 benchmarks/cuda_graphs_repro.py --device cpu --variants shipped --steps 2   # CPU smoke

Each variant is one `vlm train` (the product's recipe, HF Trainer included) of the tiny Qwen2-VL of
`vlm.zoo` on synthetic data, in this one process (dynamo and the CUDA-graph trees reset between
runs), with the GPU test's settings: kernels, gradient checkpointing, batches padded to 128 tokens,
compile + cuda_graphs, fp32. The step that failed on the H200 was the first replay (step 3).

  shipped        as `vlm train` runs now: a step mark before each micro-batch; the fallback on
                 (the line says whether it fired, i.e. whether the mark alone was enough)
  no_mark        no step marks and no fallback: the code before the fix (raw torch error)
  no_mark_bf16   no_mark with 16-bit weights and precision bf16 (the benchmark's dtype)
  no_mark_no_gc  no_mark without gradient checkpointing (no checkpoint inside the layers)
  no_mark_cache  no_mark with the training forward's KV cache kept on (the code before ea6bd5e:
                 compiled layers with the checkpoint inside were handed transformers' DynamicCache)

Prints one line per variant: ok (steps, losses, fallback) or the error torch raised.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {   # name -> (config overrides, step marks, fallback, KV cache turned off)
    "shipped": ({}, True, True, True),
    "no_mark": ({}, False, False, True),
    "no_mark_bf16": ({"model.dtype": "bf16", "training.precision": "bf16"}, False, False, True),
    "no_mark_no_gc": ({"training.gradient_checkpointing": False}, False, False, True),
    "no_mark_cache": ({}, False, False, False),
}


def _config(root: Path, ckpt: Path, data: Path, device: str, steps: int, extra: dict):
    from vlm.train.config import parse_config

    cfg = {"model": {"path": str(ckpt), "dtype": "fp32", "device": device}, "kernels": True,
           "lora": {"r": 8, "alpha": 16, "targets": ["language.attention", "language.mlp"]},
           "data": {"train": [str(data)], "max_length": 128},
           "training": {"lr": 5e-3, "max_steps": steps, "batch_size": 4, "save_steps": 1000, "logging_steps": 1,
                        "precision": "fp32", "seed": 3, "gradient_checkpointing": True, "schedule": "constant",
                        "warmup_ratio": 0.0, "compile": True, "cuda_graphs": True},
           "output": str(root / "out"), "logging": {"tensorboard": False, "progress": False}}
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return parse_config(cfg)


def run_variant(name: str, root: Path, ckpt: Path, data: Path, device: str, steps: int) -> str:
    import torch

    import vlm.train.graph_steps as graph_steps
    import vlm.train.no_kv_cache as no_kv_cache
    from vlm.train.recipe import train

    extra, mark, fallback, no_cache = VARIANTS[name]
    real_mark, real_fall_back = graph_steps.mark_step_begin, graph_steps.GraphSteps._fall_back
    real_disable = no_kv_cache.disable_kv_cache
    # fast_path.apply imports it from the module when it runs: the module's name is the one to swap
    no_kv_cache.disable_kv_cache = (lambda model: []) if not no_cache else real_disable

    def no_fallback(self, error):
        raise RuntimeError(error)

    graph_steps.mark_step_begin = real_mark if mark else (lambda: None)
    graph_steps.GraphSteps._fall_back = real_fall_back if fallback else no_fallback
    from torch._inductor.cudagraph_trees import MarkStepBox

    torch._dynamo.reset()   # also clears the CUDA-graph trees
    MarkStepBox.mark_step_counter = 0   # "no step marks yet": torch's own default mode of generations
    t0 = time.perf_counter()
    try:
        result = train(_config(root / name, ckpt, data, device, steps, extra))
        s = result.summary
        losses = " ".join(f"{loss:.4f}" for _, loss in s["loss_history"])
        return (f"{name}: ok, {s['steps']} steps, losses {losses}; fallback "
                f"{s['cuda_graphs_fallback'] and s['cuda_graphs_fallback']['step']}; "
                f"{time.perf_counter() - t0:.0f} s")
    except Exception as e:  # noqa: BLE001 - the line reports it
        return f"{name}: {type(e).__name__}: {str(e).strip()[:200]} ({time.perf_counter() - t0:.0f} s)"
    finally:
        graph_steps.mark_step_begin, graph_steps.GraphSteps._fall_back = real_mark, real_fall_back
        no_kv_cache.disable_kv_cache = real_disable


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    sys.path.insert(0, str(REPO))
    from vlm.data_formats.synthetic import generate
    from vlm.zoo import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = build_tiny("qwen2_vl", root / "ckpt", seed=0)
        data = generate(root / "data", n=24, seed=5).sharegpt_json
        lines = [run_variant(name, root, ckpt, data, args.device, args.steps) for name in names]
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    for line in lines:
        print(line)
    return 0 if all(": ok," in line for line in lines if line.startswith("shipped")) else 1


if __name__ == "__main__":
    sys.exit(main())
