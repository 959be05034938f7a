"""Preference tuning with TRL's DPOTrainer on a lorakit adapter; the reference is the base model.

    python examples/trl_dpo.py               # a tiny random Llama and a word-level chat tokenizer, offline

DPO compares the policy with a reference policy. ``reference_model(model)`` is the same model
with its lorakit adapter disabled (``lorakit.core.disabled``): no second copy of the weights, as
PEFT's adapter-disable path in TRL. LorakitCallback gives adapter-only, resumable checkpoints.
"""

import argparse
import copy

import torch
from datasets import Dataset
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from lorakit.core import Adapter
from lorakit.transformers import LorakitCallback, export_peft, reference_model

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--recipe", default="lora", help="any registered recipe (lorakit recipes)")
parser.add_argument("--out", default="out")
args = parser.parse_args()

words = {f"w{i}": i for i in range(120)} | {"user": 120, "assistant": 121}
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")),
                                    unk_token="w0", pad_token="w0", eos_token="w1")
tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4))
base = copy.deepcopy(model)  # kept only to check the export against below
Adapter.from_recipe(args.recipe, rank=8).apply(model)


def turn(role, start, n):
    return [{"role": role, "content": " ".join(f"w{start + i}" for i in range(n))}]


# Toy preferences: continuing the user's count is chosen, repeating it is rejected.
g = torch.Generator().manual_seed(0)
starts = torch.randint(2, 100, (32,), generator=g).tolist()
data = Dataset.from_list([{"prompt": turn("user", s, 3), "chosen": turn("assistant", s + 3, 3),
                           "rejected": turn("assistant", s, 3)} for s in starts])
config = DPOConfig(output_dir=f"{args.out}/dpo", max_steps=args.steps, per_device_train_batch_size=8,
                   learning_rate=3e-3, save_steps=max(1, args.steps // 2), report_to=[], logging_steps=1,
                   disable_tqdm=True, use_cpu=not torch.cuda.is_available(), bf16=False)
trainer = DPOTrainer(model=model, ref_model=reference_model(model), args=config, train_dataset=data,
                     processing_class=tokenizer, callbacks=[LorakitCallback()])
trainer.train()
logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
print(f"trained {args.steps} steps: loss {logs[0]['loss']:.4f} -> {logs[-1]['loss']:.4f}, "
      f"reward margin {logs[-1]['rewards/margins']:.4f}")

path = export_peft(model, f"{args.out}/dpo-peft")
peft_model = PeftModel.from_pretrained(base, path).eval()
with torch.no_grad():
    batch = torch.tensor([[120, 5, 6, 7, 121, 8, 9]])
    gap = (peft_model(batch).logits - model.eval()(batch).logits).abs().max().item()
print(f"PEFT adapter: {path} (largest logit difference to lorakit's model: {gap:.1e})")
