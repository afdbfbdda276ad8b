"""`vlm export ADAPTER (--check-vllm | --merged OUT)`: vLLM checks and merged 16-bit checkpoints."""

from __future__ import annotations

import argparse
import json

from vlm.errors import VlmError

HELP = "check a LoRA adapter for vLLM (--check-vllm) or merge it into its 16-bit base (--merged OUT)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--check-vllm", action="store_true",
                        help="say whether vLLM can serve the adapter as trained, and how to fix it if not")
    parser.add_argument("--merged", metavar="OUT", default=None,
                        help="write base+adapter merged to OUT (safetensors + processor files), atomically")
    parser.add_argument("--base", default=None, help="base checkpoint (default: the one the adapter names)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="dtype of the merged weights (default: the base's)")
    parser.add_argument("--base-quant", default="auto",
                        help="'auto' (the policy training used, from the adapter's metadata, dequantized "
                             "before merging) or 'none' (merge into the base's stored 16-bit weights)")
    parser.add_argument("--verify", action="store_true",
                        help="after merging, compare logits with base+adapter on a probe image (slow for big models)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    if not args.check_vllm and not args.merged:
        raise VlmError("nothing to do: give --check-vllm and/or --merged OUT")
    status = 0
    if args.check_vllm:
        from vlm.export.check import check_adapter

        report = check_adapter(args.adapter, base=args.base)
        print(report.format())
        status = 0 if report.ok else 3
    if args.merged:
        from vlm.export.merge import export_merged

        quant = None if args.base_quant == "none" else args.base_quant
        out = export_merged(args.adapter, args.merged, base=args.base, dtype=args.dtype, quant=quant,
                            overwrite=args.overwrite)
        print(f"merged checkpoint written to {out}")
        if args.verify:
            from vlm.export.verify import compare_merged

            print(json.dumps(compare_merged(args.adapter, out, base=args.base)))
        print(f"serve it with: vlm serve {out}")
    return status
