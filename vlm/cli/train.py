"""`vlm train CONFIG.yaml [key=value ...] [--resume]`: LoRA / QLoRA fine-tuning from a YAML recipe."""

from __future__ import annotations

import os

HELP = "LoRA / QLoRA fine-tune from a YAML recipe (configs/*.yaml); key=value overrides"


def configure(parser):
    parser.add_argument("config", help="training YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config keys, e.g. training.lr=1e-4 lora.r=8 output=runs/x")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in the output folder")
    parser.add_argument("--nproc", type=int, default=None,
                        help="train on N processes (one per GPU; CPU processes on a CPU-only machine) through "
                             "accelerate launch; see the config's distributed: section")


def run(args) -> int:
    from vlm.train.config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before anything heavy starts
    if args.nproc and args.nproc > 1:
        from vlm.train.launch import relaunch_with_accelerate

        return relaunch_with_accelerate(args)
    from vlm.train.recipe import train

    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # one report per run, from the main process
        return 0
    s = result.summary
    final = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4f}"
    procs = f" on {s['processes']} processes ({s['strategy']})" if s.get("processes", 1) > 1 else ""
    print(f"trained {s['steps']} steps{procs} on {s['samples']} samples; final loss {final}; "
          f"{s['tokens_per_s']} tokens/s; peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB")
    label = {"full": "model", "projector": "projector"}.get(s.get("method"), "adapter")
    print(f"{label}: {result.adapter_dir}")
    print(f"summary: {result.output_dir / 'summary.json'}  loss curve: {result.output_dir / 'loss_curve.png'}")
    return 0
