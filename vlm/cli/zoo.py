"""`vlm zoo`: build tiny random-weight checkpoints of each supported architecture (offline).

    vlm zoo list
    vlm zoo tiny qwen2_vl runs/tiny-qwen2-vl [--seed 0]
"""

from __future__ import annotations

import argparse

HELP = "build tiny offline checkpoints of each architecture (`vlm zoo list`, `vlm zoo tiny VARIANT OUT_DIR`)"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", metavar="ACTION")
    sub.required = True
    sub.add_parser("list", help="list the variants the zoo can build")
    tiny = sub.add_parser("tiny", help="write a tiny checkpoint of VARIANT to OUT_DIR")
    tiny.add_argument("variant", metavar="VARIANT", help="one of the variants `vlm zoo list` prints")
    tiny.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    base = sub.add_parser("demo-base", help="build and train the demo's base model (small Qwen2-VL "
                          "trained on the synthetic captions); the shipped copy is vlm/zoo/assets/demo_base")
    base.add_argument("out_dir", metavar="OUT_DIR")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--steps", type=int, default=1500)
    base.add_argument("--n-train", type=int, default=4000)
    base.add_argument("--device", default="cpu", help="cpu or cuda")


def run(args: argparse.Namespace) -> int:
    from vlm.zoo import VARIANTS, build_tiny

    if args.zoo_command == "list":
        width = max(map(len, VARIANTS))
        for name, (_, description) in VARIANTS.items():
            print(f"{name:<{width}}  {description}")
        return 0
    if args.zoo_command == "demo-base":
        from vlm.zoo.demo_base import build_demo_base

        out = build_demo_base(args.out_dir, seed=args.seed, steps=args.steps, n_train=args.n_train,
                              device=args.device)
        print(f"wrote the trained demo base to {out}")
        return 0
    out = build_tiny(args.variant, args.out_dir, seed=args.seed)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote tiny {args.variant} checkpoint (seed {args.seed}, {size / 1e6:.2f} MB) to {out}")
    return 0
