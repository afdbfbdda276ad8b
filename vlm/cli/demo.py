"""`vlm demo`: the embedded end-to-end demo (QLoRA on the self-trained tiny base, before vs after)."""

from __future__ import annotations

HELP = "run the embedded demo: teach the tiny self-trained base a new captioning task with QLoRA"


def configure(parser):
    parser.add_argument("--out", default=None, help="output folder (default: runs/demo-TIMESTAMP)")
    parser.add_argument("--base", default=None, help="base model folder (default: the shipped demo base)")
    parser.add_argument("--n-train", type=int, default=384)
    parser.add_argument("--n-heldout", type=int, default=100)
    parser.add_argument("--config", default=None,
                        help="recipe (default configs/demo.yaml, LoRA); configs/demo_full.yaml: full "
                             "fine-tuning in bf16; configs/demo_projector.yaml: the projector only")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override configs/demo.yaml keys, e.g. training.max_steps=50")


def run(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from vlm.demo.run import run_demo

    run_demo(args.out, base=args.base, n_train=args.n_train, n_heldout=args.n_heldout,
             overrides=args.overrides, config=args.config)
    return 0
