"""The HF ``Trainer``'s DDP path with a lorakit adapter, no custom training code::

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29500 \\
        tests/distributed/worker_trainer.py OUT_DIR lora dora ...

Run as a plain ``python`` process it is the single-process reference (same script,
``per_device_train_batch_size`` doubled so the global batch is the same). A tiny
Llama built from a config trains ``STEPS`` steps on fixed-length token sequences
(no padding, so every rank averages over the same number of tokens). Writes
``trainer-{recipe}-rank{r}.safetensors`` (adapter state) and ``.json`` (losses).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from lorakit.core import Adapter  # noqa: E402
from lorakit.core.distributed import adapter_state_dict  # noqa: E402

GLOBAL_BATCH, STEPS, SEQ, VOCAB = 4, 3, 16, 64
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         initializer_range=0.2)  # not 0.02: attention far from uniform, real gradients
    return LlamaForCausalLM(config)


def dataset() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS, SEQ), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def main() -> None:
    out, recipes = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    for recipe in recipes:
        name = f"trainer-{recipe}" if world > 1 else f"trainer-single-{recipe}"
        with common.recorded(out, name, rank):
            model = Adapter.from_recipe(recipe, rank=4, seed=7).apply(tiny_llama(), targets=TARGETS)
            args = TrainingArguments(
                output_dir=str(out / "trainer"), per_device_train_batch_size=GLOBAL_BATCH // world,
                max_steps=STEPS, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, seed=0, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, ddp_backend="gloo" if world > 1 else None,
                dataloader_num_workers=0, disable_tqdm=True)
            start = adapter_state_dict(model)
            trainer = Trainer(model=model, args=args, train_dataset=dataset())
            trainer.train()
            state = adapter_state_dict(trainer.model)
            moved = [float((state[k] - start[k]).abs().max()) for k, p in model.named_parameters()
                     if p.requires_grad]
            meta = {"losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                    "wrapper": type(trainer.model_wrapped).__name__, "moved": [min(moved), max(moved)]}
            common.write_result(out, name, rank, state, meta)
    if world > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
