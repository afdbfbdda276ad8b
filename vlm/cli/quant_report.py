"""`vlm quant-report MODEL`: per-layer quantization error, bytes and agreement under a policy."""

from __future__ import annotations

HELP = "per-layer quantization error, chosen precision, bytes and agreement with 16-bit"


def configure(parser):
    parser.add_argument("model", help="checkpoint folder (or hub id)")
    parser.add_argument("--data", default=None,
                        help="calibration data (JSON/JSONL/parquet, ShareGPT or messages); "
                             "default: a synthetic image-caption set")
    parser.add_argument("--policy", default="dynamic",
                        help="preset (dynamic, nf4, bf16) or a policy YAML file (default: dynamic)")
    parser.add_argument("--budget", default=None,
                        help="protection budget: a multiple of the nf4 model's bytes (1.08x, the "
                             "dynamic default), a fraction of quantizable params (0.1) or bytes "
                             "(300000000, 300MB)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    parser.add_argument("--plot", default=None, metavar="OUT.png",
                        help="plot error by layer index, coloured by component")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="bf16", help="16-bit dtype of the reference (bf16)")


def run(args) -> int:
    import torch

    from vlm.quant.report import format_table, plot, report_for_path, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = report_for_path(args.model, data=args.data, policy=args.policy, budget=args.budget,
                             device=device, dtype=args.dtype)
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
