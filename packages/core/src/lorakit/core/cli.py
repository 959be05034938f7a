"""The ``lorakit`` command. Core's own subcommands are ``recipes``, ``plugins`` and
``demo``; plugins add more through the ``lorakit_commands`` hook (e.g. ``mf``,
``bench``, ``finetune``)."""


from __future__ import annotations

import argparse
import json
import sys

from .plugins import format_spec, registry
from .primitives import AdapterError
from .validation import MAX_SEED

# The top-level --help text (the module docstring speaks to developers, in reST).
DESCRIPTION = ("Composable low-rank adapters: list the registered recipes and plugins, run the demo, and "
               "(with the integrations installed) fine-tune, compare and benchmark recipes.")
EPILOG = "Run 'lorakit COMMAND --help' for a command's options and defaults."


# -- argument checks shared by the subcommands ------------------------------------------
# Each raises AdapterError, which main() prints as one "lorakit: error:" line (exit 2),
# and each runs before the command's work: a bad argument must not cost a training run.

#: the API's range (``Adapter(seed=)``, what a checkpoint may record): one range everywhere
SEED_MAX = MAX_SEED


def check_seed(value: int, option: str = "--seed") -> None:
    if not 0 <= value <= SEED_MAX:
        raise AdapterError(f"{option} {value}: a seed must be an integer in [0, {SEED_MAX}] "
                           "(the range of Adapter(seed=))")


def check_threads(value: int | None, option: str = "--threads", zero: str | None = None) -> None:
    """``zero``: what 0 means where it is allowed (e.g. "torch's default")."""
    if value is not None and value < (0 if zero else 1):
        allowed = f">= 0 (0: {zero})" if zero else ">= 1"
        raise AdapterError(f"{option} {value}: the number of threads must be {allowed}")


def check_device(name: str, option: str = "--device", auto: bool = True):
    """The torch.device for ``name`` ("auto": CUDA when available, else CPU), or an
    error naming what this machine has."""
    import torch

    if auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = ("auto, " if auto else "") + "cpu or cuda (cuda:N for GPU N)"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise AdapterError(f"{option} {name!r}: not a device; use {choices}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AdapterError(f"{option} {name}: CUDA is not available here (this torch build or machine "
                               "has none); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AdapterError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                               f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return device
    raise AdapterError(f"{option} {name}: not supported; use {choices}")


def check_output_file(path: str | None, option: str) -> None:
    """Creates the file's folder if missing and checks that a file can be written there."""
    import os
    from pathlib import Path

    if path is None or path == "-":
        return
    target = Path(path)
    if target.is_dir():
        raise AdapterError(f"{option} {path}: is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = target.parent / f".lorakit-write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise AdapterError(f"{option} {path}: cannot write there ({exc.strerror or exc}); "
                           "give another path") from None


def output_problem(path, kind: str = "folder") -> str | None:
    """What keeps a command from writing ``path`` (a ``kind`` "folder" or "file" it creates
    or replaces), found without creating anything, so that a refused command leaves no
    empty folder behind: a file where a folder goes (or the reverse), a path below a file,
    a folder that cannot be written (a probe file, since root ignores permission bits).
    None when nothing does."""
    import os
    from pathlib import Path

    path = Path(path)
    if os.path.lexists(path) and path.is_dir() != (kind == "folder"):
        return "is a folder, not a file" if kind == "file" else "is a file, not a folder"
    # the nearest existing folder above: a writer stages its output there (atomic.publish)
    above = next(p for p in (*Path(os.path.abspath(path)).parents, Path("/")) if os.path.lexists(p))
    if not above.is_dir():
        return f"is below {above}, which is a file"
    for folder in (above, *([path] if path.is_dir() else [])):
        probe = folder / f".lorakit-write-test{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"cannot write in {folder} ({exc.strerror or exc})"
    return None


def _recipes(args) -> int:
    recipes = registry.load().recipes
    rows = {name: {**r.composition(), "description": r.description, "plugin": r.plugin}
            for name, r in sorted(recipes.items())}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for name, row in rows.items():
        parts = [f"{k}={format_spec(row[k])}" for k in ("generator", "normalizer", "init", "magnitude") if row[k]]
        print(f"{name:10s} {' '.join(parts)}")
        if row["description"]:
            print(f"{'':10s} {row['description']}")
    # a recipe whose primitive no loaded plugin registers is withdrawn: say so rather than hide it
    for label, reason in registry.failures.items():
        if label.startswith("recipe "):
            print(f"withdrawn {label}: {reason}")
    return 0


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


def _recover(args) -> int:
    """Finish or clear what a killed save left beside each folder (a reader never does)."""
    from pathlib import Path

    from .atomic import recover, recover_all

    for path in map(Path, args.path):
        if not path.parent.is_dir():
            raise AdapterError(f"recover {path}: its folder {path.parent} does not exist; give a checkpoint path")
        if args.all:
            recover_all(path)
        else:
            recover(path)
        print(f"{path}: {'present' if path.exists() else 'absent (nothing complete to put back)'}")
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
    print("\n" + DEMO_LEGEND)
    return 0


DEMO_DESCRIPTION = """Compose every registered recipe on a small MLP (Linear 32->64, GELU, Linear 64->32;
rank 4 on both Linear layers), train it 5 steps, and check identity at init and merging."""
DEMO_LEGEND = """columns:
  trainable          adapter parameters that train (the base model is frozen)
  |init-base|        largest |output with the fresh adapter - output of the base model|:
                     0 (or rounding) means the adapter starts as the identity
  loss after 5 steps MSE on a toy target after 5 AdamW steps (lr 1e-2)
  |merged-unmerged|  largest |output after merge() - output before|: rounding only"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False)
    or the help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not _shows_default(action) or "default" in text:
            return text
        return super()._get_help_string(action)


def _shows_default(action: argparse.Action) -> bool:
    # a flag's True/False default says nothing the flag's name does not
    return (bool(action.option_strings) and action.default is not None and action.default is not argparse.SUPPRESS
            and not isinstance(action.default, bool))


def _help_for_defaults(parser: argparse.ArgumentParser) -> None:
    """Options registered without a help text get one, so their default shows too
    (argparse prints no line at all for an option whose help is None)."""
    for action in parser._actions:
        if action.help is None and _shows_default(action):
            action.help = "default: %(default)s"


class DemoHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """Keeps the column legend's layout."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_, run, formatter=HelpFormatter, **kwargs):
        # `parser` is kept so that main() reports an unknown option with this command's usage
        p = sub.add_parser(name, help=help_, description=kwargs.pop("description", help_),
                           formatter_class=formatter, **kwargs)
        p.set_defaults(run=run, parser=p)
        return p

    p = command("recipes", "list registered recipes and their composition", _recipes)
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p = command("plugins", "list loaded plugins, what they registered and load failures", _plugins)
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p = command("recover", "put back a checkpoint or export that a killed save left half-swapped, and delete "
                "dead writers' leftovers (load only reads; the next save does this too)", _recover)
    p.add_argument("path", nargs="+", help="checkpoint or export folder (with --all: a folder of them)")
    p.add_argument("--all", action="store_true", help="recover every folder inside each PATH (a run's checkpoints/)")
    command("demo", "compose every registered recipe on a small model", _demo, DemoHelpFormatter,
            description=DEMO_DESCRIPTION, epilog=DEMO_LEGEND)
    for name, (help_, configure, run) in sorted(registry.load().commands.items()):
        p = command(name, help_, run)
        configure(p)
        _help_for_defaults(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_args would report an unknown option with the top-level usage; the
    # command's own usage (and its --help) is what the user needs to fix it.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.run(args) or 0)
    except AdapterError as exc:  # bad input: one clear line, exit 2, no traceback
        print(f"lorakit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
