"""Mixed-adapter batches (one adapter per batch row): does lorakit need its own?

On the tiny Llama of scripts/vllm_check.py, two lorakit LoRA adapters (A, B) exported
to PEFT, a batch of ``--rows`` rows, half A and half B (interleaved):

- PEFT: one forward with ``adapter_names=[A, B, A, ...]`` vs one forward per adapter on
  its rows (``set_adapter``); rows equal to lorakit's own logits?
- lorakit without mixed batches: one model, the adapter hot-swapped between the two
  sub-batches (``lorakit.core.hotswap`` from the PEFT folders), or two models;
- vLLM (``--vllm``, in the ``.nox/vllm`` venv): greedy generation of the same prompts
  with one ``LoRARequest`` per prompt (A/B interleaved, ``max_loras=2``) vs all-A,
  tokens of each row equal to the all-A / all-B runs.

Times are medians of ``--repeats`` after a warm-up (1 thread). The decision and numbers
are in docs/design.md ("Mixed-adapter batches").

    python scripts/mixed_adapters_measure.py [--vllm] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_check import build_base  # noqa: E402


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lorakit_adapters(base, out: Path, rank: int):
    import torch

    from lorakit.core import Adapter
    from lorakit.transformers import export_peft

    made = {}
    for i, name in enumerate("AB"):
        model = copy.deepcopy(base)
        Adapter.from_recipe("lora", rank=rank, seed=i).apply(model)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 0.05))
        made[name] = (model.eval(), export_peft(model, out / name, task_type="CAUSAL_LM"))
    return made


def torch_part(base, made, args) -> dict:
    import torch
    from peft import PeftModel

    from lorakit.core import hotswap

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.rows, args.seq), generator=gen)
    names = ["A" if i % 2 == 0 else "B" for i in range(args.rows)]
    rows = {n: [i for i, m in enumerate(names) if m == n] for n in "AB"}
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(made["A"][1]), adapter_name="A")
    peft.load_adapter(str(made["B"][1]), adapter_name="B")
    peft.eval()
    with torch.no_grad():
        mixed = peft(input_ids=ids, adapter_names=names).logits
        want = torch.empty_like(mixed)
        for n in "AB":
            want[rows[n]] = made[n][0](input_ids=ids[rows[n]]).logits
        err = float((mixed - want).abs().max())

        def peft_mixed():
            peft(input_ids=ids, adapter_names=names)

        def peft_split():
            for n in "AB":
                peft.set_adapter(n)
                peft(input_ids=ids[rows[n]])

        one = made["A"][0]

        def lorakit_two_models():
            for n in "AB":
                made[n][0](input_ids=ids[rows[n]])

        def lorakit_one_batch():  # the floor: the whole batch through one adapter
            one(input_ids=ids)

        swapper = copy.deepcopy(made["A"][0])

        def lorakit_hotswap():
            for n in "AB":
                hotswap(swapper, made[n][1])
                swapper(input_ids=ids[rows[n]])

        swap_only = median_s(lambda: hotswap(swapper, made["B"][1]), args.repeats)
        t = {k: 1e3 * median_s(f, args.repeats) for k, f in [
            ("peft_mixed_adapter_names", peft_mixed), ("peft_one_forward_per_adapter", peft_split),
            ("lorakit_one_adapter_whole_batch", lorakit_one_batch), ("lorakit_two_models", lorakit_two_models),
            ("lorakit_hotswap_between_sub_batches", lorakit_hotswap)]}
    return {"rows": args.rows, "seq": args.seq, "peft_mixed_vs_lorakit_max_abs_dlogit": err,
            "hotswap_ms": 1e3 * swap_only, "forward_ms": t}


def vllm_part(base_dir: Path, made, args) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    gen = torch.Generator().manual_seed(1)
    prompts = [TokensPrompt(prompt_token_ids=[101, *torch.randint(1000, 20000, (11,), generator=gen).tolist()])
               for _ in range(args.rows)]
    llm = LLM(model=str(base_dir), dtype="float32", enable_lora=True, max_lora_rank=16, max_loras=2,
              max_model_len=128, seed=0, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    req = {n: LoRARequest(n, i + 1, str(made[n][1])) for i, n in enumerate("AB")}
    names = ["A" if i % 2 == 0 else "B" for i in range(args.rows)]

    def run(requests):
        outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    single = {n: run(req[n]) for n in "AB"}
    mixed = run([req[n] for n in names])
    same = all(mixed[i] == single[n][i] for i, n in enumerate(names))
    differ = single["A"] != single["B"]
    t = {"base_only": median_s(lambda: run(None), args.repeats), "all_A": median_s(lambda: run(req["A"]), args.repeats),
         "mixed_A_B": median_s(lambda: run([req[n] for n in names]), args.repeats)}
    return {"rows": args.rows, "tokens": args.tokens, "mixed_rows_equal_single_adapter_runs": same,
            "adapters_differ": differ, "generate_ms": {k: 1e3 * v for k, v in t.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/lorakit-mixed")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vllm", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = build_base(out / "base")
    made = lorakit_adapters(base, out, args.rank)
    report = {"torch": torch_part(base, made, args)}
    print(json.dumps(report["torch"], indent=1), flush=True)
    if args.vllm:
        report["vllm"] = vllm_part(out / "base", made, args)
        print(json.dumps(report["vllm"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.exit(main())
