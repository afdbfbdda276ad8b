"""Progress metrics: tokens/s and memory in the logs, and a loss-curve PNG at the end."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)

class ThroughputCallback(TrainerCallback):
    """Adds ``tokens_per_s`` and ``mem_gib`` (peak GPU allocated, else peak RSS) to every log."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._t0 = None
        self._tok0 = 0
        self.train_seconds = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()
        self._tok0 = self.trainer.tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        if dt > 0:
            logs["tokens_per_s"] = round((self.trainer.tokens_seen - self._tok0) / dt, 1)
        if torch.cuda.is_available():
            logs["mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        else:
            logs["rss_gib"] = round(peak_rss_bytes() / 2**30, 3)

    def on_train_end(self, args, state, control, **kw):
        if self._t0 is not None:
            self.train_seconds = time.perf_counter() - self._t0

def loss_points(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h["loss"])) for h in log_history if "loss" in h and "step" in h]

def plot_loss_curve(log_history: list[dict], out_png: str | Path, title: str = "training loss") -> Path | None:
    pts = loss_points(log_history)
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=2, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
