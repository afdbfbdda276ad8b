"""Shared by the training tests: a tiny Qwen2-VL + synthetic data + a CPU-sized config file."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_config(root: Path, checkpoint: Path, data_json: Path, *, max_steps: int, save_steps: int,
                 quant=None, batch_size: int = 4, extra: dict | None = None) -> Path:
    cfg = {
        "model": {"path": str(checkpoint), "dtype": "fp32", "device": "cpu"},
        "quant": quant,
        "kernels": False,
        "lora": {"r": 8, "alpha": 16, "targets": ["language.attention", "language.mlp"]},
        "data": {"train": [str(data_json)], "max_length": 128},
        "training": {"lr": 5e-3, "max_steps": max_steps, "batch_size": batch_size, "save_steps": save_steps,
                     "save_total_limit": 2, "logging_steps": 1, "precision": "fp32", "seed": 3,
                     "gradient_checkpointing": False, "warmup_ratio": 0.0},
        "output": str(root / "out"),
        "logging": {"tensorboard": False, "progress": False},
    }
    for key, value in (extra or {}).items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
