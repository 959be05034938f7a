"""Tables (rich, or Markdown for docs/) and a plot of a bench result."""

from __future__ import annotations


def method_rows(result: dict) -> list[list[str]]:
    rows = []
    for label, m in result["methods"].items():
        rows.append([label, f"{m['median_ms']:.1f}", f"{m['q1_ms']:.1f}–{m['q3_ms']:.1f}",
                     f"{m['median_cpu_ms']:.1f}", f"{m['peak_mem_mb']:.1f}", f"{m['trainable_params']:,}",
                     *(f"{m[k]:.1f}" if k in m else "" for k in ("load_ms", "merge_ms"))])
    return rows


METHOD_HEADER = ["method", "ms/step wall", "wall IQR", "ms/step CPU", "peak MiB", "trainable", "load ms",
                 "merge ms"]
# The project's own performance targets stay in the JSON ("target", "met") and in
# docs/benchmarks.md: a user's table shows the measurements only.
RATIO_HEADER = ["ratio (of medians)", "wall", "rounds", "CPU", "rounds"]


def _span(row: dict, key: str) -> str:
    return "{:.2f}–{:.2f}".format(*row[key]) if key in row else ""


def ratio_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, r in result["ratios"].items():
        cpu = f"{r['cpu_value']:.2f}" if "cpu_value" in r else ""
        rows.append([name, f"{r['value']:.2f}", _span(r, "value_round_min_max"), cpu,
                     _span(r, "cpu_value_round_min_max")])
    return rows


def _tables(result: dict) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of the methods table and, when the methods measured give any
    ratio (e.g. not with --peft ''), of the ratios table."""
    tables = [(METHOD_HEADER, method_rows(result))]
    if ratios := ratio_rows(result):
        tables.append((RATIO_HEADER, ratios))
    return tables


def markdown(result: dict) -> str:
    """The tables as Markdown (for docs/benchmarks.md)."""
    out = []
    for header, rows in _tables(result):
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def print_tables(result: dict, stderr: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=stderr)
    if not console.is_terminal or console.width < 120:  # two tables of 7 columns
        console = Console(stderr=stderr, width=120)
    c = result["config"]
    base = f" {c['quantize']} base" if c.get("quantize") else ""
    title = (f"{c['device']} {c['dtype']}{base}{' compiled' if c['compile'] else ' eager'}: Llama hidden "
             f"{c['hidden']} x {c['layers']} layers, batch {c['batch']}x{c['seq']}, r={c['rank']}")
    ratio_title = "ratios (lower is better); rounds: min–max over rounds"
    for (header, rows), t in zip(_tables(result), (title, ratio_title)):
        table = Table(title=t)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def plot(result: dict, path: str) -> None:
    """Bar charts of median step time (IQR whiskers) and peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["methods"])
    rows = list(result["methods"].values())
    # CPU: bars are CPU time (steadier on a shared machine), crosses wall time
    unit = "cpu_ms" if result["config"]["device"] == "cpu" else "ms"
    ms = [m[f"median_{unit}"] for m in rows]
    err = [[m[f"median_{unit}"] - m[f"q1_{unit}"] for m in rows], [m[f"q3_{unit}"] - m[f"median_{unit}"] for m in rows]]
    mem = [m["peak_mem_mb"] for m in rows]
    palette = {"lorakit": "tab:blue", "peft": "tab:orange", "reference": "tab:gray"}
    colors = [palette[m["library"]] for m in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.bar(labels, ms, yerr=err, color=colors, capsize=3)
    if unit == "cpu_ms":
        ax1.plot(labels, [m["median_ms"] for m in rows], "kx", label="wall time")
        ax1.legend(loc="upper left", fontsize=8)
    ax1.set_ylabel("median " + ("CPU " if unit == "cpu_ms" else "") + "ms per training step (IQR)")
    ax2.bar(labels, mem, color=colors)
    ax2.set_ylabel("peak memory (MiB)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    c = result["config"]
    fig.suptitle(f"lorakit (blue), PEFT (orange), no adapter (gray) — {c['device']} {c['dtype']}, "
                 f"{'torch.compile' if c['compile'] else 'eager'}, Llama {c['hidden']}x{c['layers']}, "
                 f"batch {c['batch']}x{c['seq']}, r={c['rank']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
