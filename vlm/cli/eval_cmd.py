"""`vlm eval`: not landed yet (issue #7)."""

from vlm.cli.pending import configure_pending, run_pending

HELP = "(not implemented yet: issue #7)"


def configure(parser):
    configure_pending(parser)


def run(args):
    return run_pending("eval", 7)
