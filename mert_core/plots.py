"""Plots people look at: loss curves (more live with the evaluation code)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curves(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Plot the total loss and every ``loss/*`` term against the step.

    Returns the PNG path, or None when there is nothing to plot yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss/")})
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_ylabel(key.removeprefix("loss/"), fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("training loss")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
