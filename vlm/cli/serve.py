"""`vlm serve MODEL [--adapter NAME=PATH ...]`: vLLM's OpenAI server with LoRA, started and stopped cleanly."""

from __future__ import annotations

import argparse
import shlex
import signal
import time
import sys

HELP = "serve a model (+ LoRA adapters) with vLLM's OpenAI-compatible server"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="base (or merged) checkpoint folder, or a hub id")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="a PEFT LoRA adapter folder served as model NAME (repeatable); checked first")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--api-key", default=None, help="require this bearer token (passed to vLLM)")
    parser.add_argument("--served-name", default=None, help="name of the base model in the API (default: folder name)")
    parser.add_argument("--dtype", default="auto", help="vLLM --dtype (auto, bfloat16, float16, float32)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="images per request (default: the trained value from metadata, else 1)")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM --max-model-len")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--log", default=None, help="vLLM's log file (default: a temp file, path printed)")
    parser.add_argument("--vllm-args", default="", metavar="'ARGS'",
                        help="extra vLLM server arguments, one quoted string (e.g. --vllm-args '--seed 1')")


def _raise_interrupt(signum, frame):  # SIGTERM → the same clean path as Ctrl-C
    raise KeyboardInterrupt


def run(args) -> int:
    from vlm.serve import VllmServer
    from vlm.serve.plan import parse_adapter_specs

    extra = shlex.split(args.vllm_args)
    srv = VllmServer(args.model, adapters=parse_adapter_specs(args.adapter), host=args.host,
                     port=args.port or None, api_key=args.api_key, served_name=args.served_name,
                     dtype=args.dtype, max_images=args.max_images, max_model_len=args.max_model_len,
                     extra_args=extra, startup_timeout=args.startup_timeout, log_path=args.log)
    for note in srv.launch.notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"starting vLLM on {srv.root} (log: {srv.log_path})", file=sys.stderr, flush=True)
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        srv.start()
        print(f"serving at {srv.url}  (ready in {srv.startup_seconds:.0f} s)")
        print(f"models: {', '.join(srv.model_names)}")
        print("Ctrl-C to stop", flush=True)
        while srv.alive():
            time.sleep(1.0)
        print(f"error: the vLLM server exited (code {srv.proc.returncode}). Last lines of {srv.log_path}:\n"
              f"{srv.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping vLLM ...", file=sys.stderr, flush=True)
        return 0
    finally:
        srv.stop()
        signal.signal(signal.SIGTERM, old)

