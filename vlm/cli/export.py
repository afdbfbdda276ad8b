"""`vlm export`: not landed yet (issue #8)."""

from vlm.cli.pending import configure_pending, run_pending

HELP = "(not implemented yet: issue #8)"


def configure(parser):
    configure_pending(parser)


def run(args):
    return run_pending("export", 8)
