"""``run_bench``: lorakit recipes against PEFT on one model, in one process.

Protocol (so that ratios mean something on a busy machine): one base model built
from a seed and shared by every method, one fixed batch, the same optimizer
(AdamW) for all; every method is warmed up (and compiled) first, its peak memory
measured in one profiled step, then one more untimed step per method (after a cold
``torch.compile`` the first steps ran seconds slower), then the timed
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
from .methods import (
    FLOOR,
    LORAKIT_RECIPES,
    PEFT_METHODS,
    TARGETS,
    Method,
    adapt,
    build_base,
    resident_bytes,
    trainable,
)

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
    repeats: int = 6
    warmup: int = 1
    recipes: tuple[str, ...] = LORAKIT_RECIPES
    peft: tuple[str, ...] = PEFT_METHODS
    seed: int = 0
    threads: int = 1
    lr: float = 1e-3
    floor: bool = True
    lifecycle: bool = True  # also time load and merge_and_unload (lorakit against PEFT)
    quantize: str | None = None  # nf4, fp4 or int8: every method on the same bitsandbytes-quantized base
    targets: tuple[str, ...] = field(default=tuple(TARGETS), init=False)


#: (name, numerator, denominator, metric, target or None). Metric "ms" or "mem".
LK, PF = "lorakit", "peft"
RATIOS = [
    ("time: lorakit dora / PEFT DoRA", (LK, "dora"), (PF, "dora"), "ms", 0.67),
    ("time: floor / PEFT DoRA", ("reference", "floor"), (PF, "dora"), "ms", None),
    ("memory: lorakit dora / PEFT LoRA", (LK, "dora"), (PF, "lora"), "mem", 1.05),
    ("time: lorakit lora / PEFT LoRA", (LK, "lora"), (PF, "lora"), "ms", 1.0),
    ("time: lorakit lora / floor", (LK, "lora"), ("reference", "floor"), "ms", 1.10),
    ("time excess over floor: lorakit dora / PEFT DoRA", (LK, "dora"), (PF, "dora"), "excess", None),
    ("time: lorakit op-lora / lorakit lora", (LK, "op-lora"), (LK, "lora"), "ms", 1.15),
    ("time: lorakit delora / PEFT DeLoRA", (LK, "delora"), (PF, "delora"), "ms", None),
    ("time: PEFT DoRA / PEFT LoRA", (PF, "dora"), (PF, "lora"), "ms", None),
    ("time: lorakit dora / lorakit lora", (LK, "dora"), (LK, "lora"), "ms", None),
    ("time: lorakit loldu / lorakit lora", (LK, "loldu"), (LK, "lora"), "ms", None),
    ("time: lorakit pissa / lorakit lora", (LK, "pissa"), (LK, "lora"), "ms", None),
    ("memory: lorakit dora / PEFT DoRA", (LK, "dora"), (PF, "dora"), "mem", None),
    ("memory: lorakit lora / PEFT LoRA", (LK, "lora"), (PF, "lora"), "mem", None),
    ("memory: lorakit delora / PEFT DeLoRA", (LK, "delora"), (PF, "delora"), "mem", None),
    ("memory: lorakit op-lora / lorakit lora", (LK, "op-lora"), (LK, "lora"), "mem", None),
    *((f"{what}: lorakit {name} / PEFT {label}", (LK, name), (PF, name),
       "load_ms" if what == "load" else "merge_ms", None)
      for name, label in (("lora", "LoRA"), ("dora", "DoRA"), ("delora", "DeLoRA"))
      for what in ("load", "merge_and_unload")),
]


class _Runner:
    """One method's model, optimizer and step function."""

    def __init__(self, method: Method, model, config: BenchConfig, batch: dict):
        self.method = method
        self.model = model
        self.params = trainable(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr) if self.params else None
        self.forward = torch.compile(model, backend=config.backend) if config.compile else model
        self.batch = batch
        self.wall: list[list[float]] = [[] for _ in range(config.repeats)]
        self.cpu: list[list[float]] = [[] for _ in range(config.repeats)]

    def step(self) -> None:
        if self.optimizer is None:  # the floor: backward to the embeddings' output
            embeds = self.model.get_input_embeddings()(self.batch["input_ids"]).detach().requires_grad_()
            self.forward(inputs_embeds=embeds, labels=self.batch["labels"]).loss.backward()
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.forward(**self.batch).loss.backward()
        self.optimizer.step()

    def eager_loss(self) -> float:
        with torch.no_grad():
            return float(self.model(**self.batch).loss)


def run_bench(config: BenchConfig, progress: Callable[[str, int], None] | None = None) -> dict:
    """Run the benchmark; ``progress(description, advance)`` is called as it goes.
    Returns the JSON-able result (see docs/benchmarks.md)."""
    progress = progress or (lambda description, advance: None)
    if config.device == "cpu" and config.threads > 0:
        torch.set_num_threads(config.threads)
    if config.compile:  # one compiled LlamaForCausalLM.forward per method, all kept
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 1024)
    dtype = DTYPES[config.dtype]
    base = build_base(config.hidden, config.layers, config.intermediate, config.vocab, config.seq,
                      config.seed, dtype, config.device)
    if config.quantize:  # QLoRA: the same quantized frozen base for lorakit and PEFT (lm_head stays float)
        from lorakit.bitsandbytes import quantize

        quantize(base, config.quantize, compute_dtype=dtype).requires_grad_(False)
    g = torch.Generator().manual_seed(config.seed + 1)
    ids = torch.randint(0, config.vocab, (config.batch, config.seq), generator=g).to(config.device)
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        base_loss = float(base(**batch).loss)
    for module in base.modules():  # bitsandbytes int8: its first forward moved CB/SCB off the shared weight
        state = getattr(module, "state", None)
        if callable(getattr(module, "init_8bit_state", None)) and getattr(module.weight, "CB", 0) is None \
                and state is not None and state.CB is not None:
            # back on it, as on a model no forward has run on: every method's first forward (and
            # PEFT's .to(), which copies the weight's SCB) then finds them there
            module.weight.CB, module.weight.SCB = state.CB, state.SCB

    methods = [Method("lorakit", r) for r in config.recipes] + [Method("peft", p) for p in config.peft]
    methods += [FLOOR] if config.floor else []
    runners = []
    for method in methods:
        progress(f"build {method.label}", 0)
        runners.append(_Runner(method, adapt(method, base, config.rank, config.seed), config, batch))

    results: dict[str, dict] = {}
    for r in runners:  # identity at init, warm-up (and compile), peak memory
        init_loss = r.eager_loss()
        breaks = _graph_breaks()
        start = time.perf_counter()
        for _ in range(config.warmup):
            progress(f"{'compile' if config.compile else 'warm up'} {r.method.label}", 0)
            r.step()
            progress(f"warm up {r.method.label}", 1)
        warmup_s = time.perf_counter() - start
        progress(f"memory {r.method.label}", 0)
        peak = step_peak_bytes(r.step, config.device) + resident_bytes(r.model, r.optimizer)
        progress(f"memory {r.method.label}", 1)
        results[r.method.label] = {
            "library": r.method.library, "method": r.method.name,
            "trainable_params": sum(p.numel() for p in r.params),
            # with --dtype bfloat16 both libraries keep the adapter in fp32 (PEFT's autocast_adapter_dtype)
            "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in r.params}),
            "peak_mem_mb": peak / 2**20,
            "warmup_s": warmup_s,
            "init_loss_minus_base": init_loss - base_loss,
            "graph_breaks": _graph_breaks() - breaks if config.compile else None,
        }

    for r in runners:  # one untimed round: compile work that trails the warm-up settles
        progress(f"settle {r.method.label}", 0)
        r.step()
        progress(f"settle {r.method.label}", 1)

    for k in range(config.repeats):  # alternating rounds, rotated start
        order = runners[k % len(runners):] + runners[:k % len(runners)]
        for r in order:
            for _ in range(config.steps):
                wall, cpu = timed(r.step, config.device)
                r.wall[k].append(wall * 1e3)
                r.cpu[k].append(cpu * 1e3)
                progress(f"round {k + 1}/{config.repeats} {r.method.label}", 1)

    for r in runners:
        results[r.method.label].update(_summary(r.wall, "ms"), **_summary(r.cpu, "cpu_ms"),
                                       final_loss=r.eager_loss())
    if config.lifecycle and not config.quantize:  # a bitsandbytes base is not deep-copied
        from .lifecycle import load_and_merge_ms

        progress("load/merge (alternating rounds)", 0)
        for method, times in load_and_merge_ms([(r.method, r.model) for r in runners], base, config.device).items():
            results[method.label].update(times)
    return {
        "config": {**asdict(config), "recipes": list(config.recipes), "peft": list(config.peft),
                   "targets": list(config.targets)},
        "environment": _environment(config),
        "base_loss": base_loss,
        "methods": results,
        "ratios": ratios(results),
    }


def _summary(rounds: list[list[float]], unit: str) -> dict:
    flat = [t for rnd in rounds for t in rnd]
    q = statistics.quantiles(flat, n=4) if len(flat) > 1 else [flat[0]] * 3
    return {f"median_{unit}": statistics.median(flat), f"q1_{unit}": q[0], f"q3_{unit}": q[2],
            f"round_medians_{unit}": [statistics.median(rnd) for rnd in rounds]}


def ratios(results: dict) -> dict:
    """Each ratio of RATIOS whose two methods ran. Time ratios are given on wall
    time (``value``) and on CPU time (``cpu_value``), with the per-round range."""
    by_key = {(v["library"], v["method"]): v for v in results.values()}
    floor = by_key.get(("reference", "floor"))
    out = {}
    for name, num, den, metric, target in RATIOS:
        if num not in by_key or den not in by_key or (metric == "excess" and floor is None):
            continue
        a, b = by_key[num], by_key[den]
        if metric.endswith("_ms") and not (metric in a and metric in b):  # load/merge not measured
            continue
        row = {"metric": metric, "target": target}
        if metric in ("ms", "excess"):
            for unit, key in (("ms", "value"), ("cpu_ms", "cpu_value")):
                # "excess": (a − floor) / (b − floor), what each step costs above the frozen model
                f = [0.0] * len(a[f"round_medians_{unit}"]) if metric == "ms" else floor[f"round_medians_{unit}"]
                f_med = 0.0 if metric == "ms" else floor[f"median_{unit}"]
                row[key] = (a[f"median_{unit}"] - f_med) / (b[f"median_{unit}"] - f_med)
                per_round = [(x - z) / (y - z) for x, y, z in zip(a[f"round_medians_{unit}"],
                                                                  b[f"round_medians_{unit}"], f)]
                row[f"{key}_round_min_max"] = [min(per_round), max(per_round)]
        elif metric.endswith("_ms"):  # load / merge: wall and CPU, per alternating round
            for unit, key in ((metric, "value"), (metric.replace("_ms", "_cpu_ms"), "cpu_value")):
                if unit in a and unit in b:
                    row[key] = a[unit] / b[unit]
                if f"round_{unit}" in a and f"round_{unit}" in b:
                    per_round = [x / y for x, y in zip(a[f"round_{unit}"], b[f"round_{unit}"])]
                    row[f"{key}_round_min_max"] = [min(per_round), max(per_round)]
        else:
            row["value"] = a["peak_mem_mb"] / b["peak_mem_mb"]
        row["met"] = None if target is None else bool(row["value"] <= target)
        out[name] = row
    return out


def total_ticks(config: BenchConfig) -> int:
    n = len(config.recipes) + len(config.peft) + config.floor
    return n * (config.warmup + 2 + config.repeats * config.steps)


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
        env["gpu"] = torch.cuda.get_device_name(config.device)
    return env
