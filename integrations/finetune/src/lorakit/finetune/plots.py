"""PNG plots of a run (loss curve) and of a comparison (curves + metric bars).

Figures are drawn with matplotlib's object API on an Agg canvas: no pyplot global
state, no display needed.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as the progress bar shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)


def _legend(ax, fontsize: str = "small") -> None:
    """A legend, or where nothing was drawn (every run diverged) a note saying so:
    an empty plot must not look like a plot of nothing wrong."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)
    else:
        ax.text(0.5, 0.5, "no finished run to show (every run diverged)", ha="center", va="center",
                transform=ax.transAxes)


def loss_curve(losses: list[float], path: Path, title: str, ylabel: str) -> Path:
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="per step")
    ax.plot(steps, smooth(losses), color="tab:blue", linewidth=1.8, label="moving average")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return path


def compare_plot(runs: list[dict], path: Path, metric: str, ylabel: str) -> Path:
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    colors = [f"C{i}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        left.plot(range(1, len(run["losses"]) + 1), smooth(run["losses"]), color=color, label=run["label"])
    left.set(xlabel="step", ylabel=ylabel + " (moving average)", title="training loss")
    left.grid(alpha=0.3)
    left.legend(fontsize="small")
    values = [run["metrics"][metric] for run in runs]
    bars = right.bar([run["label"] for run in runs], values, color=colors)
    right.bar_label(bars, fmt="%.3f", fontsize="small")
    lo, hi = min(values + [0.0]), max(values)
    right.set_ylim(lo, hi + 0.1 * (hi - lo or 1))
    right.set(ylabel=f"held-out {metric}", title=f"held-out {metric} (higher is better)")
    right.tick_params(axis="x", labelrotation=30)
    right.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return path


def sweep_lr_plot(rows: list[dict], path: Path, metric: str) -> Path:
    """Held-out metric against learning rate (log x): median over seeds, min–max band,
    a cross where some seed diverged."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        color = f"C{i}"
        pts = [(r["lr"], r["metric"]) for r in row["per_lr"] if r["metric"] is not None]
        if pts:
            xs = [x for x, _ in pts]
            ax.plot(xs, [s["median"] for _, s in pts], "o-", color=color, label=row["label"])
            ax.fill_between(xs, [s["min"] for _, s in pts], [s["max"] for _, s in pts], color=color, alpha=0.2)
        lost = [r["lr"] for r in row["per_lr"] if r["diverged"]]
        if lost:
            bottom = min([s["min"] for _, s in pts] + [0.0])
            ax.plot(lost, [bottom] * len(lost), "x", color=color, markersize=9, label=f"{row['label']}: diverged")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=f"held-out {metric}",
           title=f"held-out {metric} vs learning rate (median, min–max over seeds)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    _save(fig, path)
    return path


def sweep_loss_plot(rows: list[dict], cells: list[dict], path: Path, ylabel: str) -> Path:
    """Training-loss curves at each entry's best learning rate: the median over seeds of
    the moving average, and its min–max band."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        curves = [smooth(c["losses"]) for c in cells if c["entry"]["label"] == row["label"]
                  and c["lr"] == row["best_lr"] and not c["diverged"]]
        if not curves:
            continue
        steps = range(1, min(len(c) for c in curves) + 1)
        cols = list(zip(*(c[:len(steps)] for c in curves)))
        med = [statistics.median(col) for col in cols]
        ax.plot(steps, med, color=f"C{i}", label=f"{row['label']} (lr {row['best_lr']:g})")
        ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=f"C{i}", alpha=0.2)
    ax.set(xlabel="step", ylabel=ylabel + " (moving average)", title="training loss at each entry's best lr")
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, path)
    return path


def sweep_curve_plot(rows: list[dict], path: Path, metric: str) -> Path:
    """Held-out metric against training step (``--eval-every``): per entry (colour) and
    learning rate (line style) the median over seeds and its min–max band."""
    fig = Figure(figsize=(8, 4.6))
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    for i, row in enumerate(rows):
        for j, r in enumerate(row["per_lr"]):
            if not r.get("curve"):
                continue
            xs = [s for s, _ in r["curve"]]
            ax.plot(xs, [st["median"] for _, st in r["curve"]], styles[j % len(styles)], marker=".",
                    color=f"C{i}", label=f"{row['label']} (lr {r['lr']:g})")
            ax.fill_between(xs, [st["min"] for _, st in r["curve"]], [st["max"] for _, st in r["curve"]],
                            color=f"C{i}", alpha=0.15)
    ax.set(xlabel="step", ylabel=f"held-out {metric}",
           title=f"held-out {metric} vs step (median, min–max over seeds)")
    ax.grid(alpha=0.3)
    _legend(ax, "x-small")
    _save(fig, path)
    return path
