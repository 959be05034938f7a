"""Hot-swap under torch.compile: lorakit vs PEFT's hotswap_adapter on the same tiny Llama.

    python scripts/hotswap_compare.py [--backend aot_eager|inductor]

Adapters of ranks 4, 8, 16, 32, 64 (alpha = 2r, so PEFT's scaling also changes) are saved in
both formats; each model is compiled once (rank 8 applied), then every adapter is swapped in and
the logits are compared with a fresh eager PeftModel. Prints the graphs compiled after the first
and the largest |logit| difference (docs/integrations/serving.md has the table).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo as dynamo
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from torch._dynamo.backends.registry import lookup_backend
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.core import Adapter, hotswap

RANKS, TARGETS = (4, 8, 16, 32, 64), ["q_proj", "v_proj"]


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()


class Counting:
    def __init__(self, name):
        self.backend, self.graphs = lookup_backend(name), 0

    def __call__(self, gm, inputs):
        self.graphs += 1
        return self.backend(gm, inputs)


def run(name, model, swap, folders, refs, ids, backend):
    dynamo.reset()
    counting = Counting(backend)
    compiled = torch.compile(model, backend=counting)
    with torch.no_grad():
        compiled(ids)
        first, errors, times = counting.graphs, [], []
        for folder, ref in zip(folders, refs):
            t0 = time.perf_counter()
            swap(folder)
            times.append(time.perf_counter() - t0)
            errors.append((compiled(ids).logits - ref).abs().max().item())
    print(f"| {name} | {counting.graphs - first} | {max(errors):.2g} | {1e3 * max(times):.1f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True) instead of LoRA")
    args = parser.parse_args()
    backend, dora = args.backend, args.dora
    tmp = Path(tempfile.mkdtemp())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    folders, refs = [], []
    for r in RANKS:
        torch.manual_seed(r)
        peft_model = get_peft_model(llama(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=dora,
                                                        init_lora_weights=False))
        peft_model.save_pretrained(tmp / f"r{r}")
        folders.append(tmp / f"r{r}")
        with torch.no_grad():
            refs.append(PeftModel.from_pretrained(llama(), tmp / f"r{r}").eval()(ids).logits)
    print(f"backend {backend}; {'DoRA' if dora else 'LoRA'} ranks {RANKS}")
    print("| method | recompiles after the first graph | max |Δ logit| | swap ms |")
    print("|---|---|---|---|")
    served = Adapter.from_recipe("dora" if dora else "lora", rank=8, max_rank=64).apply(llama(), targets=TARGETS)
    served.eval()
    run("lorakit hotswap, max_rank=64", served, lambda f: hotswap(served, f), folders, refs, ids, backend)
    for prepared in (True, False):
        peft_model = PeftModel.from_pretrained(llama(), folders[1]).eval()
        if prepared:
            prepare_model_for_compiled_hotswap(peft_model, target_rank=64)
        label = "PEFT hotswap_adapter" + (", prepare_model_for_compiled_hotswap(target_rank=64)" if prepared else "")
        try:
            run(label, peft_model, lambda f, m=peft_model: hotswap_adapter(m, str(f), adapter_name="default"),
                folders, refs, ids, backend)
        except Exception as exc:  # PEFT refuses some swaps without preparation
            print(f"| {label} | refused: {type(exc).__name__}: {str(exc)[:120]} | | |")


if __name__ == "__main__":
    main()
