"""`vlm train`: not landed yet (issue #6)."""

from vlm.cli.pending import configure_pending, run_pending

HELP = "(not implemented yet: issue #6)"


def configure(parser):
    configure_pending(parser)


def run(args):
    return run_pending("train", 6)
