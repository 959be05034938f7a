"""The HF ``Trainer`` + ``LorakitCallback`` under ``accelerate launch`` (tests/test_accelerate_launchers.py)::

    LORAKIT_ENGINE=fsdp accelerate launch --config_file configs/accelerate/fsdp2_cpu.yaml \\
        --num_processes 2 --main_process_port 29500 tests/distributed/worker_launchers.py OUT_DIR RECIPE
    LORAKIT_ENGINE=zero3 accelerate launch --use_deepspeed --deepspeed_config_file \\
        configs/accelerate/zero3_cpu.json --num_processes 2 ... tests/distributed/worker_launchers.py OUT_DIR RECIPE

(``LORAKIT_ENGINE`` only names the outputs.)

As a plain ``python`` process it is the single-process reference (the per-device batch doubled).
Each run trains ``STEPS`` steps, checkpointing every ``SAVE_EVERY`` (adapter-only; lorakit's
native files beside the Trainer's resume state), then a fresh model resumes from the first
checkpoint with ``trainer.train(resume_from_checkpoint=...)`` and trains to the end. Writes
``{name}-rank{r}.safetensors`` (the gathered adapter after the run and after the resumed run)
and ``.json`` (losses of both, the wrapper type, the sharding of one factor); the
checkpoints stay in ``OUT_DIR/{name}/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from worker_trainer import SEQ, TARGETS, VOCAB, tiny_llama  # noqa: E402

from lorakit.core import Adapter, AdapterError, save  # noqa: E402
from lorakit.core.distributed import adapter_state_dict  # noqa: E402
from lorakit.transformers import LorakitCallback  # noqa: E402

GLOBAL_BATCH, STEPS, SAVE_EVERY = 4, 4, 2


def dataset() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS, SEQ), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def train(out: Path, recipe: str, world: int, resume: str | None = None):
    # AdamW (stateful: resume must restore it) with a large epsilon: a tiny eps divides the
    # ranks' rounding-level gradient differences by tiny second moments
    model = Adapter.from_recipe(recipe, rank=4, seed=7).apply(tiny_llama(), targets=TARGETS)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
        learning_rate=0.05, optim="adamw_torch", adam_epsilon=1e-3, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, seed=0, logging_steps=1, save_strategy="steps", save_steps=SAVE_EVERY, report_to=[],
        use_cpu=True, ddp_backend="gloo" if world > 1 else None, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                      callbacks=[LorakitCallback()])
    trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def main() -> None:
    out, recipe = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    engine = os.environ.get("LORAKIT_ENGINE", "fsdp")
    name = f"{engine}-trainer-{recipe}" if world > 1 else f"launcher-single-{recipe}"
    with common.recorded(out, name, rank):
        trainer, losses = train(out / name, recipe, world)
        state = adapter_state_dict(trainer.model)
        factor = next(p for n, p in trainer.model.named_parameters() if p.requires_grad)
        sharding = [type(factor).__name__, list(factor.shape),
                    list(factor.to_local().shape) if isinstance(factor, DTensor) else list(factor.data.shape),
                    str(getattr(factor, "ds_status", None)), list(getattr(factor, "ds_tensor", factor).shape)]
        try:  # lorakit.core.save on one rank of a sharded model refuses (it would write shards)
            save(trainer.model, out / f"{name}-plain-save-rank{rank}")
            refused = None
        except AdapterError as error:
            refused = str(error)
        resumed, resumed_losses = train(out / name, recipe, world, resume=str(out / name / f"checkpoint-{SAVE_EVERY}"))
        state.update({f"resumed.{k}": v for k, v in adapter_state_dict(resumed.model).items()})
        meta = {"losses": losses, "resumed_losses": resumed_losses, "wrapper": type(trainer.model_wrapped).__name__,
                "sharding": sharding, "plain_save": refused}
        common.write_result(out, name, rank, state, meta)
    if world > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
