"""Plots people look at: loss curves (more live with the evaluation code)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curves(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Plot the training curves against the step, one panel per signal: the
    total loss, every ``loss/*`` term, each teacher's explained variance
    (``r2/*``) or accuracy (``acc/*``), the target and prediction perplexities
    of discrete teachers, and the feature standard deviations (log scale).

    Returns the PNG path, or None when there is nothing to plot yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    present = sorted({k for r in rows for k in r})
    panels: list[tuple[str, list[str], bool]] = [("loss", ["loss"], False)]
    panels += [(k.removeprefix("loss/"), [k], False) for k in present if k.startswith("loss/")]
    panels += [(k.replace("/", " "), [k], False) for k in present if k.startswith(("r2/", "acc/"))]
    for name in sorted({k.split("/", 1)[1] for k in present if k.startswith("ppl_target/")}):
        panels.append((f"perplexity {name}", [f"ppl_target/{name}", f"ppl_pred/{name}"], True))
    stds = [k for k in present if k.startswith("std/")]
    if stds:
        stds.sort(key=lambda k: (k != "std/conv", int(k.removeprefix("std/layer")) if k.startswith("std/layer") else -1))
        panels.append(("feature std", stds, True))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.0 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys, log) in zip(axes[:, 0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, label=key.split("/", 1)[0] if len(keys) <= 2 else key.split("/", 1)[1])
        if key.startswith("r2/"):
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")  # predicting the mean
        if log:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=6, ncol=min(len(keys), 4))
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("training loss and learning signals")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
