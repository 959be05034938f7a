"""``lorakit bench``: the command-line front of :func:`lorakit.bench.run_bench`."""

from __future__ import annotations

import json
import sys

from lorakit.core import AdapterError
from lorakit.core.cli import check_device, check_output_file, check_seed, check_threads

from .methods import PEFT_METHODS
from .runner import DTYPES, BenchConfig, run_bench, total_ticks

HELP = ("median step time and peak memory of lorakit recipes against PEFT on one Llama-like model "
        "(--model moe: LoRA on a Qwen3-MoE's fused experts)")


def _write_outputs(args, result: dict, table: str) -> None:
    """The Markdown table to stdout (stderr when the JSON goes to stdout), ``--json`` and ``--markdown``."""
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        if args.json == "-":
            json.dump(result, sys.stdout, indent=2)
        else:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


def configure(parser) -> None:
    d = BenchConfig()
    parser.add_argument("--model", choices=("llama", "moe"), default="llama",
                        help="llama (default): every recipe on a Llama-like model; moe: LoRA on the fused expert "
                             "tensors of a Qwen3-MoE (target_parameters), lorakit against PEFT, per --experts")
    parser.add_argument("--experts", default="8,32", help="--model moe: expert counts, comma-separated (top-2)")
    parser.add_argument("--device", default=d.device, help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (same settings for all)")
    parser.add_argument("--backend", default=d.backend, help="torch.compile backend (default: inductor)")
    parser.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES), help="base model dtype")
    for name in ("hidden", "layers", "intermediate", "vocab", "batch", "seq", "rank"):
        parser.add_argument(f"--{name}", type=int, default=getattr(d, name), help=f"default {getattr(d, name)}")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per method per round")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="alternating rounds")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per method first")
    parser.add_argument("--recipes", default=",".join(d.recipes),
                        help="lorakit recipes, comma-separated ('' for none)")
    parser.add_argument("--peft", default=",".join(d.peft),
                        help=f"PEFT methods among {','.join(PEFT_METHODS)} ('' for none)")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="CPU threads (default 1: steadier ratios on a shared machine; 0 = torch's default)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the reference row: the frozen model's forward+backward with no adapter")
    parser.add_argument("--sweep", metavar="NAME=V1,V2,...",
                        help="run at several sizes (e.g. hidden=256,512,1024,2048: layers and batch scaled "
                             "down with hidden); --plot and --markdown then show every ratio against the size")
    parser.add_argument("--no-load-merge", action="store_true",
                        help="skip timing load and merge_and_unload of each trained adapter")
    parser.add_argument("--json", metavar="PATH", nargs="?", const="-",
                        help="write the full result as JSON to PATH (no PATH or '-': stdout)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart")
    parser.add_argument("--markdown", metavar="PATH", help="write both tables as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--quantize", choices=("nf4", "fp4", "int8"),
                        help="quantize the frozen base with bitsandbytes (QLoRA; needs lorakit-bitsandbytes)")


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def config_from_args(args) -> BenchConfig:
    peft = _names(args.peft)
    unknown = [p for p in peft if p not in PEFT_METHODS]
    if unknown:
        raise AdapterError(f"--peft {','.join(unknown)}: unknown PEFT method; use some of {','.join(PEFT_METHODS)}")
    for name in ("hidden", "layers", "intermediate", "vocab", "batch", "seq", "rank", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise AdapterError(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.warmup < 0:
        raise AdapterError(f"--warmup {args.warmup}: must be >= 0")
    check_device(args.device, auto=False)
    check_threads(args.threads, zero="torch's default")
    check_seed(args.seed)
    if args.compile:
        _check_backend(args.backend)
    if args.sweep:
        from .sweep import parse

        parse(args.sweep)  # a bad --sweep is an error before anything runs
    for option in ("json", "markdown", "plot"):  # before the benchmark runs, not after
        check_output_file(getattr(args, option), f"--{option}")
    recipes = _names(args.recipes)
    if not recipes and not peft:
        raise AdapterError("nothing to benchmark: give --recipes and/or --peft")
    from lorakit.core import registry

    for r in recipes:
        registry.recipe(r)  # a clear error for an unknown recipe
    return BenchConfig(device=args.device, compile=args.compile, backend=args.backend, dtype=args.dtype,
                       hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                       vocab=args.vocab, batch=args.batch, seq=args.seq, rank=args.rank, steps=args.steps,
                       repeats=args.repeats, warmup=max(args.warmup, 1 if args.compile else 0),
                       recipes=recipes, peft=peft, seed=args.seed, threads=args.threads,
                       floor=not args.no_floor, quantize=args.quantize, lifecycle=not args.no_load_merge)


def _check_backend(name: str) -> None:
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):  # debug and experimental ones included
        common = sorted({*torch._dynamo.list_backends(), "eager", "aot_eager"})
        raise AdapterError(f"--backend {name!r}: not a torch.compile backend; use one of {', '.join(common)} "
                           "(all: torch._dynamo.list_backends(exclude_tags=()))")


def moe_config_from_args(args):
    """``--model moe``'s :class:`~lorakit.bench.moe.MoEBench` (sizes, steps, seed, device as the Llama bench's)."""
    from .moe import MoEBench

    taken = {"--compile": args.compile, "--quantize": args.quantize, "--sweep": args.sweep, "--plot": args.plot,
             "--no-floor": args.no_floor, "--dtype": args.dtype != BenchConfig().dtype}
    if refused := [name for name, given in taken.items() if given]:
        raise AdapterError(f"--model moe: {', '.join(refused)} not supported (it compares float32 eager LoRA on "
                           "the experts against PEFT's); leave them out")
    try:
        experts = tuple(int(e) for e in _names(args.experts))
    except ValueError:
        experts = ()
    if not experts or min(experts) < 2:
        raise AdapterError(f"--experts {args.experts!r}: give expert counts >= 2, comma-separated (e.g. 8,32)")
    config = config_from_args(args)  # the shared checks (sizes, device, threads, seed, output files)
    return MoEBench(experts=experts, hidden=config.hidden, layers=config.layers, vocab=config.vocab,
                    batch=config.batch, seq=config.seq, rank=config.rank, steps=config.steps,
                    repeats=config.repeats, warmup=config.warmup, seed=config.seed, device=config.device)


def _run_moe(args) -> int:
    import torch

    from .moe import markdown, run_moe

    config = moe_config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_moe(config)
    table = markdown(result)
    _write_outputs(args, result, table)
    return 0


def run(args) -> int:
    if args.model == "moe":
        return _run_moe(args)
    config = config_from_args(args)
    if args.sweep:
        return _run_sweep(args, config)
    if args.no_progress:
        result = run_bench(config)
    else:  # on stderr, so that --json to stdout stays clean
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description:<38}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("bench", total=total_ticks(config))
            result = run_bench(config, lambda text, n: bar.update(task, description=text, advance=n))
    from .report import print_tables

    if args.json == "-":  # JSON alone on stdout, the tables on stderr
        print_tables(result, stderr=True)
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_tables(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
            print(f"wrote {args.json}")
    if args.markdown:
        from .report import markdown

        with open(args.markdown, "w") as f:
            f.write(markdown(result))
        print(f"wrote {args.markdown}", file=sys.stderr if args.json == "-" else sys.stdout)
    if args.plot:
        from .report import plot

        plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def _run_sweep(args, config: BenchConfig) -> int:
    from . import sweep
    from .report import print_tables

    name, values = sweep.parse(args.sweep)
    result = sweep.run_sweep(config, name, values)
    for run in result["runs"]:
        print_tables(run["result"], stderr=args.json == "-")
    table = sweep.markdown(result)
    _write_outputs(args, result, table)
    if args.plot:
        sweep.plot(result, args.plot)
    return 0
