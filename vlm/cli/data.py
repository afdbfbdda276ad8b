"""`vlm data`: not landed yet (issue #3)."""

from vlm.cli.pending import configure_pending, run_pending

HELP = "(not implemented yet: issue #3)"


def configure(parser):
    configure_pending(parser)


def run(args):
    return run_pending("data", 3)
