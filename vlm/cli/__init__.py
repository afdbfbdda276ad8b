"""Command-line interface: ``vlm SUBCOMMAND``; one module per subcommand."""
