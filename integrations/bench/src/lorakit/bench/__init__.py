"""lorakit bench: step time and peak memory of lorakit recipes against PEFT.

    lorakit bench --json bench.json --plot bench.png          # CPU, eager
    lorakit bench --compile                                    # torch.compile
    lorakit bench --device cuda --compile --dtype bfloat16 --hidden 2048 --layers 8

or from Python: ``run_bench(BenchConfig(...))`` (see :mod:`lorakit.bench.runner`).
"""

from .runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
