"""LoRA / QLoRA training."""
