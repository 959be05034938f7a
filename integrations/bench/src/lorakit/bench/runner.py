"""``run_bench``: lorakit recipes against PEFT on one model, in one process.

Protocol (so that ratios mean something on a busy machine): one base model built
from a seed and shared by every method, one fixed batch, the same optimizer
(AdamW) for all; every method is warmed up (and compiled) first, then the timed
steps run in *alternating* rounds — round ``k`` visits every method once, starting
at a rotated position — so a burst of load from other processes hits all methods
alike. A method's time is the median of all its timed steps; each ratio is also
reported per round (min and max), which shows how noisy the run was.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .measure import step_peak_bytes, timed
from .methods import LORAKIT_RECIPES, PEFT_METHODS, TARGETS, Method, adapt, build_base, resident_bytes, trainable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class BenchConfig:
    device: str = "cpu"
    compile: bool = False
    backend: str = "inductor"
    dtype: str = "float32"
    hidden: int = 256
    layers: int = 4
    intermediate: int = 688
    vocab: int = 1000
    batch: int = 8
    seq: int = 128
    rank: int = 8
    steps: int = 2
    repeats: int = 5
    warmup: int = 1
    recipes: tuple[str, ...] = LORAKIT_RECIPES
    peft: tuple[str, ...] = PEFT_METHODS
    seed: int = 0
    threads: int = 1
    lr: float = 1e-3
    targets: tuple[str, ...] = field(default=tuple(TARGETS), init=False)


#: (name, numerator, denominator, metric, target or None). Metric "ms" or "mem".
RATIOS = [
    ("lorakit dora / PEFT DoRA (time)", ("lorakit", "dora"), ("peft", "dora"), "ms", 0.67),
    ("lorakit dora / PEFT LoRA (peak memory)", ("lorakit", "dora"), ("peft", "lora"), "mem", 1.05),
    ("lorakit lora / PEFT LoRA (time)", ("lorakit", "lora"), ("peft", "lora"), "ms", 1.0),
    ("lorakit op-lora / lorakit lora (time)", ("lorakit", "op-lora"), ("lorakit", "lora"), "ms", 1.25),
    ("lorakit delora / PEFT DeLoRA (time)", ("lorakit", "delora"), ("peft", "delora"), "ms", None),
    ("lorakit dora / PEFT DoRA (peak memory)", ("lorakit", "dora"), ("peft", "dora"), "mem", None),
    ("lorakit lora / PEFT LoRA (peak memory)", ("lorakit", "lora"), ("peft", "lora"), "mem", None),
    ("lorakit delora / PEFT DeLoRA (peak memory)", ("lorakit", "delora"), ("peft", "delora"), "mem", None),
    ("PEFT DoRA / PEFT LoRA (time)", ("peft", "dora"), ("peft", "lora"), "ms", None),
    ("lorakit dora / lorakit lora (time)", ("lorakit", "dora"), ("lorakit", "lora"), "ms", None),
    ("lorakit loldu / lorakit lora (time)", ("lorakit", "loldu"), ("lorakit", "lora"), "ms", None),
    ("lorakit pissa / lorakit lora (time)", ("lorakit", "pissa"), ("lorakit", "lora"), "ms", None),
    ("lorakit op-lora / lorakit lora (peak memory)", ("lorakit", "op-lora"), ("lorakit", "lora"), "mem", None),
]


class _Runner:
    """One method's model, optimizer and step function."""

    def __init__(self, method: Method, model, config: BenchConfig, batch: dict):
        self.method = method
        self.model = model
        self.params = trainable(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr)
        self.forward = model
        if config.compile:
            self.forward = torch.compile(model, backend=config.backend)
        self.batch = batch
        self.times: list[list[float]] = [[] for _ in range(config.repeats)]
        self.losses: list[float] = []

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def loss(self) -> float:
        with torch.no_grad():
            return float(self.forward(**self.batch).loss)


def run_bench(config: BenchConfig, progress: Callable[[str, int], None] | None = None) -> dict:
    """Run the benchmark; ``progress(description, advance)`` is called as it goes.
    Returns the JSON-able result (see docs/benchmarks.md)."""
    progress = progress or (lambda description, advance: None)
    if config.device == "cpu" and config.threads > 0:
        torch.set_num_threads(config.threads)
    dtype = DTYPES[config.dtype]
    base = build_base(config.hidden, config.layers, config.intermediate, config.vocab, config.seq,
                      config.seed, dtype, config.device)
    g = torch.Generator().manual_seed(config.seed + 1)
    ids = torch.randint(0, config.vocab, (config.batch, config.seq), generator=g).to(config.device)
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        base_loss = float(base(**batch).loss)

    methods = [Method("lorakit", r) for r in config.recipes] + [Method("peft", p) for p in config.peft]
    runners = []
    for method in methods:
        progress(f"build {method.label}", 0)
        runners.append(_Runner(method, adapt(method, base, config.rank, config.seed), config, batch))

    results: dict[str, dict] = {}
    for r in runners:  # warm-up (and compile), identity-at-init check, peak memory
        progress(f"warm up {r.method.label}", 0)
        graph_breaks = _graph_breaks()
        init_loss = r.loss() if not config.compile else None
        start = time.perf_counter()
        for _ in range(config.warmup):
            r.step()
            progress(f"warm up {r.method.label}", 1)
        warmup_s = time.perf_counter() - start
        peak = step_peak_bytes(r.step, config.device) + resident_bytes(r.model, r.optimizer)
        progress(f"memory {r.method.label}", 1)
        results[r.method.label] = {
            "library": r.method.library, "method": r.method.name,
            "trainable_params": sum(p.numel() for p in r.params),
            "peak_mem_mb": peak / 2**20,
            "warmup_s": warmup_s,
            "init_loss_minus_base": None if init_loss is None else init_loss - base_loss,
            "graph_breaks": _graph_breaks() - graph_breaks if config.compile else None,
        }

    for k in range(config.repeats):  # alternating rounds
        order = runners[k % len(runners):] + runners[:k % len(runners)]
        for r in order:
            for _ in range(config.steps):
                seconds, _ = timed(r.step, config.device)
                r.times[k].append(seconds * 1e3)
                progress(f"round {k + 1}/{config.repeats} {r.method.label}", 1)

    for r in runners:
        flat = [t for rnd in r.times for t in rnd]
        q = statistics.quantiles(flat, n=4) if len(flat) > 1 else [flat[0]] * 3
        results[r.method.label].update(
            median_ms=statistics.median(flat), q1_ms=q[0], q3_ms=q[2],
            round_medians_ms=[statistics.median(rnd) for rnd in r.times],
            final_loss=r.loss(),
        )
    return {
        "config": {**asdict(config), "recipes": list(config.recipes), "peft": list(config.peft),
                   "targets": list(config.targets)},
        "environment": _environment(config),
        "base_loss": base_loss,
        "methods": results,
        "ratios": ratios(results, config.repeats),
    }


def ratios(results: dict, repeats: int) -> dict:
    by_key = {(v["library"], v["method"]): v for v in results.values()}
    out = {}
    for name, num, den, metric, target in RATIOS:
        if num not in by_key or den not in by_key:
            continue
        a, b = by_key[num], by_key[den]
        if metric == "ms":
            value = a["median_ms"] / b["median_ms"]
            per_round = [x / y for x, y in zip(a["round_medians_ms"], b["round_medians_ms"])]
            spread = [min(per_round), max(per_round)]
        else:
            value, spread = a["peak_mem_mb"] / b["peak_mem_mb"], None
        out[name] = {"value": value, "round_min_max": spread, "target": target,
                     "met": None if target is None else bool(value <= target)}
    return out


def total_ticks(config: BenchConfig) -> int:
    n = len(config.recipes) + len(config.peft)
    return n * (config.warmup + 1 + config.repeats * config.steps)


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _environment(config: BenchConfig) -> dict:
    import peft
    import transformers

    env = {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "cpu_threads": torch.get_num_threads()}
    if config.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env
