"""Results of an evaluation: table, JSON, CSV and plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from mert_core.evaluation.probe import WEIGHTED, ProbeResult


def result_rows(results: Sequence[ProbeResult]) -> list[dict[str, Any]]:
    """One flat row per (upstream, task): the selected probe and all its test metrics."""
    rows = []
    for r in results:
        row = {"task": r.task, "upstream": r.upstream, "upstream_id": r.upstream_id, "metric": r.metric,
               "test": r.best["test"][r.metric], "valid": r.best["valid"][r.metric], "layer": r.best["layer"], "lr": r.best["lr"],
               "features_reused": all(r.features_reused.values()) if r.features_reused else False}
        row.update({f"test_{k}": v for k, v in r.best["test"].items() if k != r.metric})
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: task, upstream, metric, test, valid, selected layer and lr."""
    cols = ["task", "upstream", "metric", "test", "valid", "layer", "lr"]
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def format_layer_table(result: ProbeResult) -> str:
    """One probe search as plain text: each layer's best lr with its valid and
    test score, the selected one marked."""
    r = result
    out = [f"{r.upstream} on {r.task} ({r.metric}):", f"  {'layer':<14}{'lr':>9}  {'valid':>8}  {'test':>8}"]
    for m in r.per_layer:
        mark = "  <- selected" if m is r.best else ""
        out.append(f"  {m['layer']:<14}{m['lr']:>9.0e}  {m['valid'][r.metric]:>8.4f}  {m['test'][r.metric]:>8.4f}{mark}")
    return "\n".join(out)


def write_results(out_dir: Path, results: Sequence[ProbeResult], extra: dict[str, Any] | None = None) -> list[Path]:
    """Write ``results.json`` (everything, every grid member) and ``results.csv`` (one row per upstream and task)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result_rows(results)
    (out_dir / "results.json").write_text(json.dumps({**(extra or {}), "table": rows, "results": [r.to_dict() for r in results]},
                                                     indent=1, default=str))
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return [out_dir / "results.json", out_dir / "results.csv"]


def plot_layers(out_dir: Path, results: Sequence[ProbeResult]) -> list[Path]:
    """``layers_<task>.png``: test score of each layer (best lr by validation)
    per upstream; a learned weighted sum is a dashed line of the same colour.
    Upstreams whose layers are feature families (handcrafted) are drawn as
    labelled horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in dict.fromkeys(r.task for r in results):
        fig, ax = plt.subplots(figsize=(7, 4))
        metric = ""
        for i, r in enumerate(rr for rr in results if rr.task == task):
            metric = r.metric
            color = f"C{i}"
            layers = [m for m in r.per_layer if m["layer"] != WEIGHTED]
            numbered = all(m["layer"].startswith("layer") for m in layers)
            if numbered:
                xs = [int(m["layer"][len("layer"):]) for m in layers]
                ax.plot(xs, [m["test"][metric] for m in layers], "o-", color=color, label=r.upstream)
            else:
                best = max(layers, key=lambda m: m["valid"][metric])
                ax.axhline(best["test"][metric], color=color, linestyle=":", label=f"{r.upstream} ({best['layer']})")
            weighted = [m for m in r.per_layer if m["layer"] == WEIGHTED]
            if weighted:
                ax.axhline(weighted[0]["test"][metric], color=color, linestyle="--", alpha=0.7, label=f"{r.upstream} weighted sum")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (0 = transformer input)")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{task}: score per layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"layers_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_comparison(out_dir: Path, results: Sequence[ProbeResult]) -> Path:
    """``comparison.png``: the selected probe's test score, tasks x upstreams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in results))
    upstreams = list(dict.fromkeys(r.upstream for r in results))
    score = {(r.task, r.upstream): r.test_score for r in results}
    metric = {r.task: r.metric for r in results}
    width = 0.8 / max(len(upstreams), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) + 2), 4))
    for j, up in enumerate(upstreams):
        xs = [i + (j - (len(upstreams) - 1) / 2) * width for i in range(len(tasks))]
        ys = [score.get((t, up), float("nan")) for t in tasks]
        bars = ax.bar(xs, ys, width, label=up, color=f"C{j}")
        ax.bar_label(bars, labels=[_fmt(y) for y in ys], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({metric[t]})" for t in tasks], fontsize=8)
    ax.set_ylabel("test score")
    ax.set_title("upstreams compared (MARBLE probe, selected on validation)")
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    fig.tight_layout()
    path = out_dir / "comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
