"""``lorakit bench --sweep hidden=256,512,1024,2048``: the benchmark at several model
sizes, one table and one plot of every ratio against the size.

Each size is a full :func:`run_bench` (its own process state, the same protocol).
For ``hidden`` the rest of the model follows: ``intermediate = hidden · 688/256``
(the default's proportion, rounded to a multiple of 16), and ``layers`` and
``batch`` are divided by ``hidden/256`` (at least 1), so that the work of a step,
∝ tokens · hidden² · layers, stays about the same and the sweep fits a small CPU
(about a minute per size on one thread). Any other integer option sweeps alone
(``--sweep rank=4,8,16``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from lorakit.core import AdapterError

from .runner import BenchConfig, run_bench

SWEEPABLE = ("hidden", "layers", "intermediate", "batch", "seq", "rank")


def parse(text: str) -> tuple[str, list[int]]:
    """``"hidden=256,512"`` → ``("hidden", [256, 512])``."""
    name, _, values = text.partition("=")
    name = name.strip()
    try:
        sizes = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if name not in SWEEPABLE or not sizes or min(sizes) < 1 or (name == "hidden" and any(v % 64 for v in sizes)):
        raise AdapterError(f"--sweep {text!r}: use NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)} "
                           "and positive integers (hidden: multiples of 64)")
    return name, sizes


def config_at(config: BenchConfig, name: str, value: int) -> BenchConfig:
    if name != "hidden":
        return replace(config, **{name: value})
    factor = value / 256
    return replace(config, hidden=value, intermediate=max(16, round(688 * factor / 16) * 16),
                   layers=max(1, round(config.layers / factor)), batch=max(1, round(config.batch / factor)))


def run_sweep(config: BenchConfig, name: str, values: list[int],
              progress: Callable[[str, int], None] | None = None) -> dict:
    runs = []
    for value in values:
        point = config_at(config, name, value)
        result = run_bench(point, progress)
        runs.append({"value": value, "result": result})
    return {"parameter": name, "values": values, "runs": runs}


def _size(config: dict) -> str:
    return f"{config['hidden']}×{config['layers']}, {config['batch']}×{config['seq']}"


def _cell(ratio: dict | None, cpu: bool) -> str:
    if ratio is None:
        return ""
    return f"{ratio['cpu_value' if cpu and 'cpu_value' in ratio else 'value']:.2f}"


def markdown(sweep: dict) -> str:
    """One row per ratio, one column per size (CPU-time ratios on CPU)."""
    runs = sweep["runs"]
    cpu = runs[0]["result"]["config"]["device"] == "cpu"
    names = list(dict.fromkeys(n for r in runs for n in r["result"]["ratios"]))
    head = ["ratio", *(f"{sweep['parameter']} {r['value']} ({_size(r['result']['config'])})" for r in runs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * len(runs)]
    for n in names:
        lines.append("| " + " | ".join([n, *(_cell(r["result"]["ratios"].get(n), cpu) for r in runs)]) + " |")
    ms = ["lorakit lora", "no adapter (floor)", "PEFT LoRA"]
    unit = "median_cpu_ms" if cpu else "median_ms"
    for label in ms:
        if all(label in r["result"]["methods"] for r in runs):
            cells = [f"{r['result']['methods'][label][unit]:.1f}" for r in runs]
            lines.append("| " + " | ".join([f"ms/step: {label}", *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot(sweep: dict, path: str) -> None:
    """Every ratio against the swept size: time ratios left, memory and load/merge right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sweep["runs"]
    cpu = runs[0]["result"]["config"]["device"] == "cpu"
    xs = sweep["values"]
    names = list(dict.fromkeys(n for r in runs for n in r["result"]["ratios"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for i, n in enumerate(names):  # 10 colours, then the same colours dashed: every line distinct
        ys = [float(_cell(r["result"]["ratios"].get(n), cpu) or "nan") for r in runs]
        ax = ax1 if n.startswith("time") else ax2
        ax.plot(xs, ys, marker="os^"[i // 10 % 3], ls=("-", "--", ":")[i // 10 % 3], color=f"C{i % 10}", label=n)
    for ax, title in ((ax1, "time ratios" + (" (CPU time)" if cpu else "")), (ax2, "memory, load, merge ratios")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(sweep["parameter"])
        ax.set_title(title)
        ax.legend(fontsize=7)
    c = runs[0]["result"]["config"]
    fig.suptitle(f"lorakit bench --sweep {sweep['parameter']}: {c['device']} {c['dtype']}, "
                 f"{'torch.compile' if c['compile'] else 'eager'}, r={c['rank']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
