"""The ``vlm`` command: one subcommand per module in ``vlm.cli``.

Each subcommand module exposes ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``.
Errors print one line (``error: ...``) and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vlm.errors import VlmError
from vlm.train.startup_clock import install_import_clock

# name -> module; the order is the order `vlm --help` lists them in.
SUBCOMMANDS = {
    "train": "vlm.cli.train",
    "eval": "vlm.cli.eval_cmd",
    "quant-report": "vlm.cli.quant_report",
    "data": "vlm.cli.data",
    "serve": "vlm.cli.serve",
    "export": "vlm.cli.export",
    "zoo": "vlm.cli.zoo",
    "demo": "vlm.cli.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm", description="Fine-tune, evaluate and serve vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    install_import_clock()   # before anything heavy: `vlm train` reports which packages its imports took
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except VlmError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
