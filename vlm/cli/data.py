"""``vlm data``: check datasets and preview how a sample is rendered and trained.

    vlm data check DATA... [--model PATH] [--image-root DIR] [--json OUT] [--rejects FILE]
    vlm data preview DATA --model PATH [--index N]

``check`` exits 0 when every record is valid, 1 when any is bad (each printed with file, record
index/id and problem), 2 on usage errors.
"""

from __future__ import annotations

import os
import sys

HELP = "validate datasets (check) and show how a sample renders and trains (preview)"


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    check = sub.add_parser("check", help="validate every record; token statistics with --model")
    check.add_argument("data", nargs="+", help=".json / .jsonl / .parquet files or datasets folders")
    _common(check)
    check.add_argument("--json", dest="json_out", help="write the full report as JSON here")
    check.add_argument("--rejects", help="write every bad record (JSONL) here")
    preview = sub.add_parser("preview", help="show one rendered sample and which tokens train")
    preview.add_argument("data", help="one data file or folder")
    _common(preview)
    preview.add_argument("--index", type=int, default=0, help="record index (default 0)")


def _common(p) -> None:
    p.add_argument("--model", help="checkpoint folder: its processor gives token counts")
    p.add_argument("--image-root", help="folder relative image paths resolve against "
                                        "(default: each data file's folder)")
    p.add_argument("--max-length", type=int, default=2048, help="token cap (default 2048)")
    p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate")
    p.add_argument("--train-on", choices=("assistant", "last_assistant", "all"), default="assistant")
    p.add_argument("--max-pixels", type=int, help="image max_pixels (Qwen2-VL family)")
    p.add_argument("--min-pixels", type=int, help="image min_pixels (Qwen2-VL family)")
    p.add_argument("--video-fps", type=float, default=2.0, help="video frames sampled per second (2)")
    p.add_argument("--video-max-frames", type=int, default=32, help="frames per video at most (32)")


def _collator(args):
    from transformers import AutoProcessor

    from vlm.data_formats.collator import VisionChatCollator
    from vlm.data_formats.resolution import Resolution, load_resolution
    from vlm.families import family_for_config
    from vlm.load import load_config

    family = family_for_config(load_config(args.model))
    processor = AutoProcessor.from_pretrained(args.model)
    resolution = load_resolution(args.model)
    if args.min_pixels or args.max_pixels:
        resolution = Resolution(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    return VisionChatCollator(processor, family, max_length=args.max_length, train_on=args.train_on,
                              overlong=args.overlong, resolution=resolution, pad_to_multiple_of=1,
                              video_fps=args.video_fps, video_max_frames=args.video_max_frames)


def run(args) -> int:
    if args.data_command == "check":
        return _run_check(args)
    return _run_preview(args)


def _run_check(args) -> int:
    from vlm.data_formats.check import check_data
    from vlm.data_formats.rejects import RejectLog

    for d in args.data:
        if not os.path.exists(d):
            print(f"error: {d}: no such file or folder", file=sys.stderr)
            return 2
    collator = _collator(args) if args.model else None
    report = check_data(args.data, image_root=args.image_root, collator=collator,
                        rejects=RejectLog(args.rejects, keep=10_000))
    print(report.text())
    if args.json_out:
        from vlm.atomic import write_json

        write_json(args.json_out, report.as_dict())
    return 0 if report.ok else 1


def _run_preview(args) -> int:
    from vlm.data_formats.preview import preview_sample
    from vlm.errors import VlmError

    if not args.model:
        raise VlmError("vlm data preview needs --model PATH (the processor renders the sample)")
    print(preview_sample(args.data, _collator(args), index=args.index, image_root=args.image_root))
    return 0
