"""``lorakit bench --model moe``: fused-expert LoRA on a small Qwen3-MoE, lorakit against PEFT.

Same model, data and seed for each method, at each expert count E (top-2 routing):

- floor: the frozen model, backward to the embeddings' output (as the Llama bench's);
- lorakit lora: ``Adapter.from_recipe("lora").apply(target_parameters="experts")``;
- PEFT lora: ``LoraConfig(target_modules=[], target_parameters=["gate_up_proj", "down_proj"])``.

Step time: median over interleaved rounds of forward + backward + AdamW (the mean of
``steps`` steps per round), wall clock and the process's CPU time (steadier on a shared
machine); "excess" is the time above the floor. Peak: the highest
extra allocation during one step (:func:`lorakit.bench.measure.step_peak_bytes`) plus the
adapter's parameters and AdamW's two moments (the resident weights are the same for all).
PEFT materializes ``W + BA`` of every expert each step (an E × out × in tensor per fused
parameter, and its gradient); lorakit computes expert e's term on the tokens routed to e.
"""

from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import asdict, dataclass

import torch

from .measure import step_peak_bytes, synchronize, timed

EXPERT_WIDTH = 256  # moe_intermediate_size
METHODS = ("floor", "lorakit lora", "peft lora")


@dataclass(frozen=True)
class MoEBench:
    experts: tuple[int, ...] = (8, 32)
    hidden: int = 256
    layers: int = 4
    vocab: int = 1000
    batch: int = 8
    seq: int = 128
    rank: int = 8
    steps: int = 2
    repeats: int = 6
    warmup: int = 1
    seed: int = 0
    device: str = "cpu"


def build(config: MoEBench, experts: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(config.seed)
    heads = max(1, config.hidden // 64)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=config.vocab, hidden_size=config.hidden, intermediate_size=2 * config.hidden,
        moe_intermediate_size=EXPERT_WIDTH, num_hidden_layers=config.layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), head_dim=config.hidden // heads, num_experts=experts,
        num_experts_per_tok=2))
    return model.to(config.device)


def methods(base, rank: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from lorakit.core import Adapter

    return {"floor": copy.deepcopy(base).requires_grad_(False),
            "lorakit lora": Adapter.from_recipe("lora", rank=rank).apply(copy.deepcopy(base),
                                                                          target_parameters="experts"),
            "peft lora": get_peft_model(copy.deepcopy(base), LoraConfig(
                r=rank, lora_alpha=rank, target_modules=[], target_parameters=["gate_up_proj", "down_proj"]))}


def stepper(model, batch):
    """``(step, resident adapter bytes)``: one training step of ``model`` on ``batch``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        def floor_step():
            embeds = model.get_input_embeddings()(batch).detach().requires_grad_()
            model(inputs_embeds=embeds, labels=batch).loss.backward()
        return floor_step, 0
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    return step, 3 * sum(p.numel() * p.element_size() for p in params)  # parameters + AdamW's two moments


def run_experts(config: MoEBench, experts: int) -> dict:
    base = build(config, experts)
    batch = torch.randint(0, config.vocab, (config.batch, config.seq),
                          generator=torch.Generator().manual_seed(config.seed + 1)).to(config.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on target_parameters
        steps = {name: stepper(model.train(), batch) for name, model in methods(base, config.rank).items()}
    for step, _ in steps.values():
        for _ in range(max(config.warmup, 1)):  # AdamW's state exists before anything is measured
            step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(config.repeats):
        for name, (step, _) in steps.items():  # interleaved: drift on a shared machine hits all alike
            wall, cpu = timed(lambda s=step: [s() for _ in range(config.steps)], config.device)
            times[name].append((wall / config.steps, cpu / config.steps))
    synchronize(config.device)
    result = {name: {"ms": 1e3 * statistics.median(t for t, _ in times[name]),
                     "cpu_ms": 1e3 * statistics.median(c for _, c in times[name]),
                     "peak_mib": (step_peak_bytes(step, config.device) + resident) / 2**20}
              for name, (step, resident) in steps.items()}
    for name in METHODS[1:]:
        for clock in ("ms", "cpu_ms"):
            result[name][f"excess_{clock}"] = result[name][clock] - result["floor"][clock]
    ours, theirs = result["lorakit lora"], result["peft lora"]

    def ratio(key):  # None: PEFT within noise of the floor (tiny sizes)
        return ours[key] / theirs[key] if theirs[key] > 0 else None
    result["ratios"] = {"excess lorakit / peft": ratio("excess_ms"),
                        "excess cpu lorakit / peft": ratio("excess_cpu_ms"), "peak lorakit / peft": ratio("peak_mib")}
    return result


def run_moe(config: MoEBench, progress=None) -> dict:
    """``{"config": ..., "results": {E: {method: {ms, peak_mib[, excess_ms]}, "ratios": ...}}}``."""
    results = {}
    for experts in config.experts:
        if progress is not None:
            progress(f"moe E={experts}", 1)
        results[str(experts)] = run_experts(config, experts)
    return {"config": asdict(config), "results": results}


def markdown(result: dict) -> str:
    rows = ["| E | method | step ms (CPU ms) | above floor ms (CPU ms) | peak MiB |", "|---|---|---|---|---|"]

    def x(value):
        return "–" if value is None else f"{value:.2f}x"
    for experts, r in result["results"].items():
        for name in METHODS:
            m = r[name]
            excess = f"{m['excess_ms']:.1f} ({m['excess_cpu_ms']:.1f})" if "excess_ms" in m else "–"
            rows.append(f"| {experts} | {name} | {m['ms']:.1f} ({m['cpu_ms']:.1f}) | {excess} | {m['peak_mib']:.1f} |")
        q = r["ratios"]
        rows.append(f"| {experts} | lorakit / PEFT | | {x(q['excess lorakit / peft'])} "
                    f"({x(q['excess cpu lorakit / peft'])}) | {x(q['peak lorakit / peft'])} |")
    return "\n".join(rows) + "\n"
