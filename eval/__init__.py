"""Caption evaluation harness (installed as ``vlm.eval``)."""
