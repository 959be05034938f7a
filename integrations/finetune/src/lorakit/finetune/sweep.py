"""``sweep(entries, lrs, seeds, config)``: recipes × learning rates × seeds, one fine-tune each.

The papers' claims about fine-tuning are claims over a range of settings, not one
run: DeLoRA's robustness to the learning rate (Bini et al., ICLR 2025, §3.4, Fig. 2–3),
OP-LoRA's faster convergence (Teterwak et al., arXiv:2412.10362, §5), LoLDU's accuracy
at a tiny parameter count (Shi et al., arXiv:2410.13618, Tables I/IV). A sweep runs
``finetune`` for every cell of the grid and reports, per entry and learning rate, the
median and range over seeds of

- the held-out metric (Pearson on the default MiniLM + VADER task);
- the area under the training-loss curve, ``AUC = mean_t loss_t`` over the same
  steps (lower = faster convergence at equal steps);

and, per entry, its best learning rate (highest median metric). A cell whose loss
becomes non-finite is recorded as diverged (its metric counts as missing, and the
table says how many seeds diverged).

**Resumable.** Each finished cell writes ``cells/<entry>/lr<lr>-seed<seed>/cell.json``
(``<lr>`` exact: :func:`lr_text`); a rerun with the same options skips every cell whose
``cell.json`` records the same setup, so an interrupted sweep continues where it stopped.
A damaged record (not JSON, not an object, missing or malformed keys) reruns that cell
only; a folder or other non-file where a record belongs is one error before any cell runs. The cells' checkpoints
and PEFT exports are deleted once their result is recorded (an OP-LoRA cell's
optimizer state is ~130 MB) unless ``keep_checkpoints``.

An entry is a recipe name, optionally with parts replaced as ``lorakit finetune``
takes them, joined by ``+``: ``op-lora+generator=mlp:gain=2``,
``loldu+init=ldu:init=s_uniform``. ``ENTRY@LR/LR...`` gives that entry its own learning
rates instead of ``--lrs`` (``delora+normalizer=delora:lambda0=1@2.5e-2/1e-1``); its cells
are those of the same entry and rate in any other sweep.

**Along the way** (``eval_every`` > 0): each cell also records ``curve``, the held-out
metric of the live model every ``eval_every`` steps of its one training run, and the
sweep reports its median and [min, max] over seeds at each step (``sweep-curve.png``).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

from lorakit.core.atomic import atomic_write
from lorakit.core.validation import read_json

from .errors import FinetuneError
from .train import PRIMARY, FinetuneConfig, check_writable, finetune

#: the default grid: DeLoRA vs LoRA over 6 learning rates spanning 3 decades
#: (10^(3/5) ≈ 4 apart), 3 seeds, 100 steps: 36 fine-tunes of ~25 s each, ~15 min on a 2-core CPU
DEFAULT_ENTRIES = ("lora", "delora")
DEFAULT_LRS = (1e-4, 4e-4, 1.6e-3, 6.3e-3, 2.5e-2, 1e-1)
DEFAULT_SEEDS = (0, 1, 2)
PARTS = ("generator", "normalizer", "init", "magnitude")
#: the setup a cell's result depends on; a cell.json that differs in any of these is rerun
SETUP_KEYS = ("model", "data", "text_column", "label_column", "task", "targets", "rank", "steps", "lambda_lr",
              "weight_decay", "warmup", "batch_size", "max_length", "test_fraction", "split_seed", "dropout",
              "quantize", "eval_every")
#: setup keys added later, recorded only when set: the records written before them stay valid
OPTIONAL_SETUP_KEYS = ("lambda_lr_ratio",)


def parse_entry(text: str) -> dict:
    """``"op-lora+generator=mlp:gain=2"`` → ``{"label", "recipe", "generator": "mlp:gain=2", ...}``."""
    recipe, *parts = [p.strip() for p in text.strip().split("+")]
    entry = {"label": text.strip(), "recipe": recipe or None}
    for part in parts:
        key, eq, spec = part.partition("=")
        if not eq or key not in PARTS or not spec:
            raise FinetuneError(f"sweep entry {text!r}: write RECIPE+PART=SPEC with PART one of {', '.join(PARTS)} "
                                "(e.g. op-lora+generator=mlp:gain=2)")
        entry[key] = spec
    return entry


def split_lrs(text: str) -> tuple[str, list[float] | None]:
    """``"lora@6.3e-3/2.5e-2"`` → ``("lora", [0.0063, 0.025])``; no ``@``: ``(text, None)``."""
    text, at, rates = text.strip().partition("@")
    if not at:
        return text, None
    try:
        lrs = [float(v) for v in rates.split("/") if v.strip()]
    except ValueError:
        lrs = []
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs) or len(set(lrs)) != len(lrs):
        raise FinetuneError(f"sweep entry {text + at + rates!r}: after @ give distinct positive learning rates "
                            "separated by / (e.g. lora@6.3e-3/2.5e-2)")
    return text, lrs


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def lr_text(lr: float) -> str:
    """``f"{lr:g}"`` when that reads back as ``lr`` exactly, else ``repr(lr)`` (shortest
    exact form): distinct rates never share a name (``1e-4`` and ``1.000001e-4`` did)."""
    short = f"{lr:g}"
    return short if float(short) == lr else repr(float(lr))


def _cell_dir(out: Path, label: str, lr: float, seed: int) -> Path:
    return out / "cells" / _slug(label) / f"lr{lr_text(lr)}-seed{seed}"


#: what a finished cell's record holds, each key with the types downstream code reads
RECORD_KEYS = {"entry": dict, "lr": float, "seed": int, "setup": dict, "diverged": bool}
RESULT_KEYS = {"metric": (int, float), "metrics": dict, "losses": list, "auc": (int, float), "trainable": dict,
               "task": str}


def _record_problem(done, entry: dict, lr: float, seed: int) -> str | None:
    """Why a parsed ``cell.json`` cannot stand for this cell's result (None: it can)."""
    if not isinstance(done, dict):
        return f"holds a JSON {type(done).__name__}, not a cell record"
    wanted = {**RECORD_KEYS, **({} if done.get("diverged") is True else RESULT_KEYS)}
    missing = sorted(k for k in wanted if k not in done)
    if missing:
        return f"lacks {missing}"
    bad = sorted(k for k, t in wanted.items() if not isinstance(done[k], t)
                 or (t in (int, dict) and isinstance(done[k], bool)))
    if done.get("curve") is not None and not isinstance(done["curve"], list):  # None: a diverged cell
        bad = [*bad, "curve"]
    if bad or (not done["diverged"] and not isinstance(done["trainable"].get("adapter"), int)):
        return f"has malformed {bad or ['trainable']}"
    if done["lr"] != lr or done["seed"] != seed:
        return f"records lr={done['lr']!r}, seed={done['seed']!r} instead of lr={lr!r}, seed={seed!r}"
    return None


def check_cell_paths(out: Path, grid: list) -> None:
    """Before any cell runs: every cell's folder and record must be writable where they
    are (a folder where ``cell.json`` belongs would fail only after that cell trained)."""
    slugs: dict[str, str] = {}
    for entry, _, _ in grid:
        other = slugs.setdefault(_slug(entry["label"]), entry["label"])
        if other != entry["label"]:
            raise FinetuneError(f"sweep entries {other!r} and {entry['label']!r} share the cell folder "
                                f"{_slug(entry['label'])!r}; rename one of them")
    for name in ("sweep.json", "sweep.md", "sweep-lr.png", "sweep-loss.png", "sweep-curve.png"):
        if (out / name).exists() and not (out / name).is_file():
            raise FinetuneError(f"sweep: {out / name} is not a regular file; remove it or give another --out")
    for entry, lr, seed in grid:
        folder = _cell_dir(out, entry["label"], lr, seed)
        for path, what in ((folder, "folder"), (folder / "cell.json", "file")):
            if not path.exists() and not path.is_symlink():
                continue
            if (what == "folder") != path.is_dir() or (what == "file" and not path.is_file()):
                raise FinetuneError(f"sweep: {path} is {'not a folder' if what == 'folder' else 'not a regular file'}"
                                    f"; remove it (that cell is then run again) or give another --out")


def _lambda_lr_text(cfg: FinetuneConfig) -> str:
    if cfg.lambda_lr_ratio is not None:
        return f"= {cfg.lambda_lr_ratio:g} x lr"
    return "= lr" if cfg.lambda_lr is None else f"{cfg.lambda_lr:g}"


def _setup(cfg: FinetuneConfig) -> dict:
    return {k: getattr(cfg, k, None) for k in SETUP_KEYS} | {
        k: getattr(cfg, k) for k in OPTIONAL_SETUP_KEYS if getattr(cfg, k, None) is not None}


def loss_auc(losses: list[float]) -> float:
    """Area under the loss curve per step: ``mean_t loss_t`` (equal steps, so comparable)."""
    return sum(losses) / len(losses)


def run_cell(entry: dict, lr: float, seed: int, cfg: FinetuneConfig, out: Path, keep_checkpoints: bool,
             log) -> dict:
    """One fine-tune of the grid, or the recorded result of an identical earlier one."""
    folder = _cell_dir(out, entry["label"], lr, seed)
    record = folder / "cell.json"
    setup = _setup(cfg)
    if record.is_file():
        try:
            done = read_json(record)
            problem = _record_problem(done, entry, lr, seed)
        except (OSError, ValueError) as exc:  # AdapterError is a ValueError
            problem = f"cannot be read ({exc})"
        if problem:  # a damaged record: this cell only runs again
            log(f"sweep: {record} {problem}; running that cell again")
        elif done["setup"] == setup and done["entry"] == entry:
            return {**done, "resumed": True}
    parts = {k: entry.get(k) for k in PARTS}
    run_cfg = replace(cfg, recipe=entry["recipe"], **parts, lr=lr, seed=seed, out=str(folder), resume=None,
                      progress=False)
    cell = {"entry": entry, "lr": lr, "seed": seed, "setup": setup}
    try:
        s = finetune(run_cfg, label=entry["label"], log=lambda *_: None)
    except FinetuneError as exc:
        if "the loss became" not in str(exc):
            raise
        cell.update(diverged=True, error=str(exc), metric=None, metrics=None, losses=None, auc=None, curve=None)
    else:
        cell.update(diverged=False, metric=s["metric"]["value"], metrics=s["metrics"], losses=s["losses"],
                    auc=loss_auc(s["losses"]), trainable=s["trainable_parameters"], threads=s["threads"],
                    train_seconds=s["train_seconds"], cpu_ms_per_step=s.get("cpu_ms_per_step"), task=s["task"],
                    curve=s["curve"])
    if not keep_checkpoints:
        for sub in ("checkpoints", "peft"):
            shutil.rmtree(folder / sub, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(record, lambda tmp: tmp.write_text(json.dumps(cell)))  # a kill leaves the old record or the new
    return cell


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(cells: list[dict], entries: list[dict], lrs: list[float],
              lrs_of: dict[str, list[float]] | None = None) -> list[dict]:
    """Per entry: per learning rate (``lrs_of[label]``, else ``lrs``) the metric's and AUC's
    median/min/max over seeds, the held-out curve's at each step, the diverged count, and
    the best learning rate (highest median metric)."""
    from .curves import curve_stats

    rows = []
    for entry in entries:
        per_lr = []
        for lr in (lrs_of or {}).get(entry["label"]) or lrs:
            mine = [c for c in cells if c["entry"]["label"] == entry["label"] and c["lr"] == lr]
            ok = [c for c in mine if not c["diverged"]]
            per_lr.append({"lr": lr, "metric": _stats([c["metric"] for c in ok]),
                           "auc": _stats([c["auc"] for c in ok]), "curve": curve_stats(ok, _stats),
                           "diverged": len(mine) - len(ok),
                           "seeds": len(mine)})
        scored = [r for r in per_lr if r["metric"] is not None]
        best = max(scored, key=lambda r: r["metric"]["median"]) if scored else None
        trainable = next((c["trainable"]["adapter"] for c in cells
                          if c["entry"]["label"] == entry["label"] and not c["diverged"]), None)
        rows.append({"label": entry["label"], "per_lr": per_lr, "best_lr": best and best["lr"],
                     "best": best and best["metric"], "trainable": trainable})
    return rows


def _fmt(stats: dict | None, digits: int = 4) -> str:
    if stats is None:
        return "—"
    return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"


def table(rows: list[dict], metric: str) -> str:
    """Markdown: one row per entry × learning rate (median [min, max] over seeds)."""
    lines = [f"| entry | lr | held-out {metric}: median [min, max] | loss AUC: median [min, max] | diverged |",
             "|---|---:|---|---|---:|"]
    for row in rows:
        for r in row["per_lr"]:
            star = " **best**" if r["lr"] == row["best_lr"] else ""
            lines.append(f"| {row['label']} | {lr_text(r['lr'])} | {_fmt(r['metric'])}{star} | {_fmt(r['auc'])} | "
                         f"{r['diverged']}/{r['seeds']} |")
    lines += ["", f"| entry | trainable (adapter) | best lr | {metric} at best lr | worst median {metric} | "
                  f"lrs within 0.01 of best |", "|---|---:|---:|---|---:|---:|"]
    for row in rows:
        medians = [r["metric"]["median"] if r["metric"] else float("nan") for r in row["per_lr"]]
        finite = [m for m in medians if math.isfinite(m)]
        near = sum(m >= row["best"]["median"] - 0.01 for m in finite) if row["best"] else 0
        worst = f"{min(finite):.4f}" if len(finite) == len(medians) and finite else "diverged"
        trainable = "—" if row["trainable"] is None else f"{row['trainable']:,}"
        lines.append(f"| {row['label']} | {trainable} | {row['best_lr'] if row['best_lr'] is not None else '—'} | "
                     f"{_fmt(row['best'])} | {worst} | {near}/{len(medians)} |")
    return "\n".join(lines)


def sweep(entries: list[str], lrs: list[float], seeds: list[int], cfg: FinetuneConfig, *,
          keep_checkpoints: bool = False, log=print) -> dict:
    """Run (or resume) the grid; write ``sweep.json``, ``sweep.md``, ``sweep-lr.png``
    and ``sweep-loss.png`` into ``cfg.out``; return the result."""
    split = [split_lrs(e) for e in entries]
    parsed = [parse_entry(text) for text, _ in split]
    lrs_of = {e["label"]: own for e, (_, own) in zip(parsed, split) if own}
    if len({e["label"] for e in parsed}) != len(parsed) or not parsed:
        raise FinetuneError("sweep: give distinct entries")
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs) or len(set(lrs)) != len(lrs):
        raise FinetuneError(f"--lrs {lrs}: give distinct positive learning rates")
    if not seeds or len(set(seeds)) != len(seeds):
        raise FinetuneError(f"--seeds {seeds}: give distinct seeds")
    from lorakit.finetune.compose import build_adapter

    for e in parsed:  # an unknown recipe or primitive fails now, not after an hour of other cells
        build_adapter(e["recipe"], **{k: e.get(k) for k in PARTS}, rank=cfg.rank)
    out = Path(cfg.out)
    check_writable(out)
    from tqdm.auto import tqdm

    grid = [(e, float(lr), seed) for e in parsed for lr in lrs_of.get(e["label"], lrs) for seed in seeds]
    check_cell_paths(out, grid)
    cells = []
    with tqdm(total=len(grid), desc="sweep", unit="run", file=sys.stderr, disable=not cfg.progress,
              dynamic_ncols=True) as bar:
        for entry, lr, seed in grid:
            bar.set_postfix_str(f"{entry['label']} lr={lr_text(lr)} seed={seed}")
            cell = run_cell(entry, lr, seed, cfg, out, keep_checkpoints, log)
            cells.append(cell)
            bar.update()
    task = next((c["task"] for c in cells if not c["diverged"]), "regression")
    metric = PRIMARY[task]
    rows = aggregate(cells, parsed, [float(lr) for lr in lrs], lrs_of)
    md = table(rows, metric)
    if cfg.eval_every:
        from .curves import curve_table

        md += "\n\n" + curve_table(rows, metric)
    n_resumed = sum(bool(c.get("resumed")) for c in cells)
    setup = (f"{'MiniLM-L6 (embedded)' if cfg.model is None else cfg.model}, "
             f"{'VADER lexicon (embedded)' if cfg.data is None else cfg.data}, {cfg.steps} steps x batch "
             f"{cfg.batch_size}, AdamW (warm-up {cfg.warmup:g}, linear decay), rank {cfg.rank}, "
             f"lambda lr {_lambda_lr_text(cfg)}, dropout {cfg.dropout:g}, "
             f"seeds {','.join(map(str, seeds))}, split seed {cfg.split_seed}"
             + (f", held-out {metric} every {cfg.eval_every} steps" if cfg.eval_every else ""))
    from .plots import sweep_loss_plot, sweep_lr_plot

    lr_png = sweep_lr_plot(rows, out / "sweep-lr.png", metric)
    loss_png = sweep_loss_plot(rows, cells, out / "sweep-loss.png",
                               "MSE (standardized)" if task == "regression" else "cross-entropy")
    plots = [str(lr_png), str(loss_png)]
    if cfg.eval_every:
        from .plots import sweep_curve_plot

        plots.append(str(sweep_curve_plot(rows, out / "sweep-curve.png", metric)))
    atomic_write(out / "sweep.md", lambda tmp: tmp.write_text(f"{md}\n\n{setup}\n"))
    result = {"setup": setup, "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
              "entries": parsed, "lrs": list(lrs), "lrs_of": lrs_of, "seeds": list(seeds), "metric": metric,
              "rows": rows,
              "table": md, "cells": [{k: v for k, v in c.items() if k != "resumed"} for c in cells],
              "plots": plots}
    atomic_write(out / "sweep.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    log("\n" + md + "\n\n" + setup)
    log(f"\n{len(grid)} runs ({n_resumed} resumed from earlier results)\ntable: {out / 'sweep.md'} "
        f"(and {out / 'sweep.json'})\nplots: {', '.join(plots)}")
    return result
