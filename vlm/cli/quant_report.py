"""`vlm quant-report`: not landed yet (issue #4)."""

from vlm.cli.pending import configure_pending, run_pending

HELP = "(not implemented yet: issue #4)"


def configure(parser):
    configure_pending(parser)


def run(args):
    return run_pending("quant-report", 4)
