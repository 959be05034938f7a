"""The ``lorakit`` command. Core's own subcommands are ``recipes``, ``plugins`` and
``demo``; plugins add more through the ``lorakit_commands`` hook (e.g. ``mf``,
``bench``, ``finetune``)."""

from __future__ import annotations

import argparse
import json
import sys

from .plugins import registry
from .primitives import AdapterError


def _recipes(args) -> int:
    recipes = registry.load().recipes
    rows = {name: {**r.composition(), "description": r.description, "plugin": r.plugin}
            for name, r in sorted(recipes.items())}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for name, row in rows.items():
        parts = [f"{k}={_spec_str(row[k])}" for k in ("generator", "normalizer", "init", "magnitude") if row[k]]
        print(f"{name:10s} {' '.join(parts)}")
        if row["description"]:
            print(f"{'':10s} {row['description']}")
    return 0


def _spec_str(spec: dict) -> str:
    args = ",".join(f"{k}={v}" for k, v in spec["args"].items())
    return spec["name"] + (f"({args})" if args else "")


def _plugins(args) -> int:
    reg = registry.load()
    rows: list[dict] = [{"name": p.name, "distribution": p.distribution, "version": p.version,
             "hooks": p.hooks, "registered": p.registered} for p in reg.plugins.values()]
    failures = [{"name": n, "error": e} for n, e in reg.failures.items()]
    if args.json:
        print(json.dumps({"plugins": rows, "failures": failures}, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']} ({row['distribution']} {row['version']}): {', '.join(row['registered']) or '-'}")
    for f in failures:
        print(f"FAILED {f['name']}: {f['error']}")
    return 0


def _demo(args) -> int:
    """Compose every registered recipe on a small MLP and show what it did."""
    import torch

    from . import Adapter, merge, parameter_report, unmerge

    for name in sorted(registry.load().recipes):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
        x = torch.randn(16, 32)
        before = model(x).detach()
        Adapter.from_recipe(name, rank=4).apply(model, targets=["0", "2"])
        same = (model(x) - before).abs().max().item()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            loss = (model(x) - x.flip(0)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        y = model(x).detach()
        merge(model)
        gap = (model(x) - y).abs().max().item()
        unmerge(model)
        report = parameter_report(model)
        print(f"{name:8s} trainable={report['trainable']:6d}  |init-base|={same:.1e}  "
              f"loss after 5 steps={loss.item():.4f}  |merged-unmerged|={gap:.1e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("recipes", help="list registered recipes and their composition")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_recipes)
    p = sub.add_parser("plugins", help="list loaded plugins, what they registered and load failures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_plugins)
    p = sub.add_parser("demo", help="compose every registered recipe on a small model")
    p.set_defaults(run=_demo)
    for name, (help_, configure, run) in sorted(registry.load().commands.items()):
        p = sub.add_parser(name, help=help_)
        configure(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except AdapterError as exc:  # bad input: one clear line, exit 2, no traceback
        print(f"lorakit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
