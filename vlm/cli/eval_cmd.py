"""`vlm eval`: caption a fixed eval set under several variants and compare them with the bf16 baseline.

    vlm eval --model PATH [--adapter PATH] --data EVAL [--compare bf16,nf4,dynamic]
             [--endpoint URL --served-model NAME] [--out DIR] [--max-new-tokens N] [--prompt TEXT]
    vlm eval --config eval.yaml [--out DIR ...]      (YAML keys = the long flags, with underscores)

Writes results.json, results.md, chart.png and captions.jsonl under --out.
"""

from __future__ import annotations

import argparse

from vlm.config.schema import load_yaml
from vlm.errors import ConfigError

HELP = "caption an eval set under bf16/nf4/dynamic (or an endpoint): metrics, agreement, memory, speed"

# flag -> (type, help); None type = store_true/false handled separately
_FLAGS = {
    "model": (str, "base checkpoint folder or hub id"),
    "adapter": (str, "PEFT LoRA adapter folder, applied to every local variant"),
    "data": (str, "eval file: ShareGPT or messages records (JSON/JSONL/parquet); the assistant turn is the reference"),
    "compare": (str, "comma-separated variants: bf16, fp16, fp32, nf4, dynamic or a quant-policy YAML "
                     "(default bf16; bf16 is always run as the baseline)"),
    "endpoint": (str, "OpenAI-compatible server URL (e.g. http://localhost:8000/v1)"),
    "served_model": (str, "model/adapter name on the endpoint"),
    "out": (str, "output folder (default eval_out)"),
    "prompt": (str, "one prompt for every image or video (default: each record's own user text)"),
    "max_new_tokens": (int, "greedy decoding length (default 32)"),
    "min_new_tokens": (int, "force at least N tokens (matches vLLM's min_tokens; default 0)"),
    "batch_size": (int, "images or videos per generate call (default 8)"),
    "device": (str, "cpu, cuda, cuda:1 ... (default: cuda if available)"),
    "image_root": (str, "folder relative image paths resolve against (default: the data file's folder)"),
    "limit": (int, "evaluate only the first N images or videos"),
    "clip_model": (str, "open_clip model name or hf-hub:org/name for CLIPScore (default ViT-B-32)"),
    "clip_weights": (str, "CLIP weights: local checkpoint file or open_clip pretrained tag; without it CLIPScore is skipped"),
    "scene_vocab": (str, "synthetic scenes only: report per-attribute accuracy in this vocabulary (default, variant, demo)"),
    "endpoint_timeout": (float, "seconds per endpoint request (default 120)"),
    "endpoint_concurrency": (int, "parallel endpoint requests (default 1)"),
    "api_key": (str, "bearer token for the endpoint (default: $VLM_API_KEY)"),
    "video_fps": (float, "video records: frames sampled per second of video, as in training (default 2)"),
    "video_max_frames": (int, "video records: at most N frames per video (default 32)"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the same keys (flags given here override it)")
    for name, (tp, help_) in _FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=tp, default=None, help=help_)
    parser.add_argument("--no-meteor", dest="meteor", action="store_false", default=None,
                        help="skip METEOR (its Java scorer takes 20-50 s)")
    parser.add_argument("--spice", dest="spice", action="store_true", default=None,
                        help="require SPICE (default: only when its CoreNLP jars are installed)")


def config_from_args(args: argparse.Namespace):
    from vlm.eval.harness import EvalConfig

    data: dict = load_yaml(args.config) if getattr(args, "config", None) else {}
    if "eval" in data and isinstance(data["eval"], dict) and len(data) == 1:
        data = data["eval"]
    for name in list(_FLAGS) + ["meteor", "spice"]:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    if isinstance(data.get("compare"), str):
        data["compare"] = [s for s in data["compare"].split(",") if s.strip()]
    if not data.get("data"):
        raise ConfigError("--data EVAL is required (a ShareGPT or messages file with reference captions)")
    return EvalConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    from vlm.eval.harness import run_eval
    from vlm.eval.report import markdown_table

    config = config_from_args(args)
    results = run_eval(config)
    print(markdown_table(results), end="")
    return 0
