"""Per-component quantization policies and sensitivity analysis."""
