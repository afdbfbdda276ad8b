"""`vlm export SOURCE (--check-vllm | --merged OUT | --gguf OUT)`: vLLM checks, merged 16-bit checkpoints,
GGUF for llama.cpp / Ollama."""

from __future__ import annotations

import argparse
import json

from vlm.errors import VlmError

HELP = ("check a LoRA adapter for vLLM (--check-vllm), merge it into its 16-bit base (--merged OUT), or "
        "write GGUF + mmproj + Ollama Modelfile (--gguf OUT)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="SOURCE", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors); for --gguf also a checkpoint folder")
    parser.add_argument("--check-vllm", action="store_true",
                        help="say whether vLLM can serve the adapter as trained, and how to fix it if not")
    parser.add_argument("--merged", metavar="OUT", default=None,
                        help="write base+adapter merged to OUT (safetensors + processor files), atomically")
    parser.add_argument("--gguf", metavar="OUT", default=None,
                        help="write llama.cpp / Ollama files to OUT: model-QUANT.gguf, mmproj-f16.gguf, Modelfile "
                             "(SOURCE: an adapter, merged first, or a 16-bit checkpoint folder)")
    parser.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_k_m"],
                        help="language-model GGUF type for --gguf (q4_k_m needs the built runtime: make gguf-deps)")
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
    if not args.check_vllm and not args.merged and not args.gguf:
        raise VlmError("nothing to do: give --check-vllm, --merged OUT and/or --gguf OUT")
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
    if args.gguf:
        from vlm.export.gguf import export_gguf

        out = export_gguf(args.adapter, args.gguf, quant=args.quant, base=args.base, overwrite=args.overwrite)
        print(f"GGUF written to {out}\nrun it with: llama-mtmd-cli -m {out}/model-{args.quant}.gguf "
              f"--mmproj {out}/mmproj-f16.gguf --image IMAGE -p PROMPT\nor: ollama create NAME -f {out}/Modelfile")
    return status
