"""Host memory and the loss-curve PNG written at the end of training."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


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
    from vlm.atomic import save_figure

    save_figure(fig, out_png)
    plt.close(fig)
    return Path(out_png)
