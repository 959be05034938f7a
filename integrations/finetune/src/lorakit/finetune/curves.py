"""The held-out metric along one training run (``--eval-every``), over seeds.

A cell's ``curve`` is ``[[step, metric], ...]``: the live model evaluated every N steps
of its single run (no refit per point). Per entry and learning rate the sweep reports,
at each step ``t`` that every finished seed evaluated, ``median_s metric_s(t)`` and
``[min_s, max_s]``.
"""

from __future__ import annotations


def curve_stats(cells: list[dict], stats) -> list[list] | None:
    """``[[step, stats(values at step)], ...]`` over the steps all ``cells`` share; None
    without curves (``stats`` is the sweep's median/min/max/n summary)."""
    curves = [{int(s): v for s, v in c.get("curve") or []} for c in cells]
    if not curves or not all(curves):
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [[s, stats([c[s] for c in curves])] for s in steps] or None


def _cell(st: dict) -> str:
    return f"{st['median']:.3f} [{st['min']:.3f}, {st['max']:.3f}]"


def curve_table(rows: list[dict], metric: str) -> str:
    """Markdown: one row per entry × learning rate, one column per evaluated step, each
    ``median [min, max]`` over seeds; then the drop from the curve's best median to its
    last (how much the run lost by training on)."""
    steps = sorted({s for row in rows for r in row["per_lr"] for s, _ in r.get("curve") or []})
    if not steps:
        return f"(no held-out {metric} curve: run with --eval-every N)"
    lines = [f"held-out {metric} vs step: median [min, max] over seeds", "",
             "| entry | lr | " + " | ".join(f"step {s}" for s in steps) + " | best median (step) | last − best |",
             "|---|---:|" + "---|" * len(steps) + "---:|---:|"]
    for row in rows:
        for r in row["per_lr"]:
            at = dict((s, st) for s, st in r.get("curve") or [])
            if not at:
                continue
            best = max(at, key=lambda s: at[s]["median"])
            last = at[max(at)]["median"] - at[best]["median"]
            cells = [(_cell(at[s]) if s in at else "—") for s in steps]
            lines.append(f"| {row['label']} | {r['lr']:g} | " + " | ".join(cells)
                         + f" | {at[best]['median']:.3f} ({best}) | {last:+.3f} |")
    return "\n".join(lines)
