"""Fine-tune a causal LM with the Hugging Face Trainer and export a PEFT adapter.

    python examples/causal_lm_trainer.py                      # a tiny random Llama, seconds on a CPU
    python examples/causal_lm_trainer.py --model PATH --steps 200   # your local model folder

The adapter is DoRA (any recipe or composition works the same way); LorakitCallback
makes the Trainer's checkpoints hold the adapter only (and resumable with
``trainer.train(resume_from_checkpoint=True)``). The export loads with plain PEFT, no
lorakit needed: ``PeftModel.from_pretrained(base, "out/peft")``, as the end shows.
"""

import argparse
import copy

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lorakit.core import Adapter, parameter_report
from lorakit.transformers import LorakitCallback, export_peft

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", help="local causal-LM folder (default: a tiny random Llama)")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--out", default="out")
args = parser.parse_args()

if args.model:
    model = AutoModelForCausalLM.from_pretrained(args.model)
else:  # the same architecture as Llama, small enough for CI
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
vocab = model.config.vocab_size
base = copy.deepcopy(model)  # kept only to check the export against below

# No targets: the registered Llama defaults (q/k/v/o_proj, gate/up/down_proj).
Adapter.from_recipe("dora", rank=8).apply(model)
print(parameter_report(model))

# Toy data: token sequences that count upwards, which the model learns to continue.
starts = torch.randint(0, vocab, (64, 1))
sequences = (starts + torch.arange(16)) % vocab
dataset = [{"input_ids": s, "labels": s} for s in sequences]

training = TrainingArguments(output_dir=f"{args.out}/trainer", max_steps=args.steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, save_steps=max(1, args.steps // 2), report_to=[],
                             logging_steps=1, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[LorakitCallback()])
result = trainer.train()
print(f"trained {args.steps} steps, loss {result.training_loss:.3f}")

# A standard PEFT LoRA/DoRA folder: the generated factors (and magnitudes), exactly.
path = export_peft(model, f"{args.out}/peft", base_model_name_or_path=args.model)

# PEFT alone computes what the lorakit model computes.
peft_model = PeftModel.from_pretrained(base, path).eval()
with torch.no_grad():
    batch = sequences[:4].to(model.device)
    gap = (peft_model(batch).logits - model.eval()(batch).logits).abs().max().item()
print(f"PEFT adapter: {path} (largest logit difference to lorakit's model: {gap:.1e})")
