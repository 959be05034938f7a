"""Fused-expert LoRA on a small Qwen3-MoE: lorakit's target_parameters vs PEFT's, per training step.

    python scripts/moe_bench.py --experts 8 32 [--threads 1] [--repeats 5] [--json out.json]

Same model, data and seed for each method: the floor (no adapter; backward to the
embeddings' output, as ``lorakit bench``), lorakit LoRA and PEFT LoRA (``target_parameters``
= every ``gate_up_proj`` and ``down_proj``, r = 8). Step time: median over interleaved
repeats of forward + backward + AdamW (wall); "excess" is the time above the floor. Peak:
the highest extra CPU allocation during one step (``lorakit.bench.measure.step_peak_bytes``:
activations, gradients, temporaries; the resident weights are the same for both) plus the
adapter's parameters and AdamW state. PEFT materializes ``W + BA`` of every expert each step
(an E × out × in tensor per fused parameter, and its gradient); lorakit computes expert e's
term on the tokens routed to e only.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import warnings

import torch


def build(experts: int, seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=experts, num_experts_per_tok=2)
    return Qwen3MoeForCausalLM(config)


def methods(base, rank: int):
    from peft import LoraConfig, get_peft_model

    from lorakit.core import Adapter

    floor = copy.deepcopy(base).requires_grad_(False)
    ours = Adapter.from_recipe("lora", rank=rank).apply(copy.deepcopy(base), target_parameters="experts")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=[],
                                                             target_parameters=["gate_up_proj", "down_proj"]))
    return {"floor": floor, "lorakit lora": ours, "peft lora": theirs}


def stepper(model, batch):
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


def run(experts: int, rank: int, repeats: int, tokens: int) -> dict:
    from lorakit.bench.measure import step_peak_bytes, timed

    base = build(experts)
    batch = torch.randint(0, 1024, (tokens // 128, 128), generator=torch.Generator().manual_seed(1))
    steps = {name: stepper(model.train(), batch) for name, model in methods(base, rank).items()}
    for step, _ in steps.values():  # warm-up (and AdamW's state)
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (step, _) in steps.items():
            times[name].append(timed(step, "cpu")[0])
    result = {}
    for name, (step, resident) in steps.items():
        ms = 1e3 * statistics.median(times[name])
        result[name] = {"ms": ms, "peak_mib": (step_peak_bytes(step, "cpu") + resident) / 2**20}
    floor = result["floor"]["ms"]
    for name in ("lorakit lora", "peft lora"):
        result[name]["excess_ms"] = result[name]["ms"] - floor
    ours, theirs = result["lorakit lora"], result["peft lora"]
    result["ratios"] = {"excess lorakit / peft": ours["excess_ms"] / theirs["excess_ms"],
                        "peak lorakit / peft": ours["peak_mib"] / theirs["peak_mib"]}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step (sequences of 128)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = {}
    print("| E | method | step ms | above floor ms | peak MiB |\n|---|---|---|---|---|")
    for experts in args.experts:
        results[experts] = r = run(experts, args.rank, args.repeats, args.tokens)
        for name in ("floor", "lorakit lora", "peft lora"):
            excess = f"{r[name]['excess_ms']:.1f}" if "excess_ms" in r[name] else "–"
            print(f"| {experts} | {name} | {r[name]['ms']:.1f} | {excess} | {r[name]['peak_mib']:.1f} |")
        print(f"| {experts} | lorakit / PEFT | | {r['ratios']['excess lorakit / peft']:.2f}x | "
              f"{r['ratios']['peak lorakit / peft']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
