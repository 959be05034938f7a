"""One process of the ``accelerate launch`` test: the adapted model trained the way an
accelerate user writes it (``prepare`` wraps it in DDP and shards the data loader)::

    accelerate launch --cpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_ip 127.0.0.1 --main_process_port 29500 \\
        tests/distributed/worker_accelerate.py OUT_DIR lora dora ...

Writes ``accelerate-{recipe}-rank{r}.safetensors`` / ``.json`` as worker.py does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from lorakit.core.distributed import adapter_state_dict  # noqa: E402


def main() -> None:
    out, recipes = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    # the global batches of common.data(), one after the other: accelerate hands
    # process r the r-th of each group of `world` consecutive per-process batches
    xs, ys = zip(*common.data())
    dataset = TensorDataset(torch.cat(xs), torch.cat(ys))
    for recipe in recipes:
        name = f"accelerate-{recipe}"
        with common.recorded(out, name, rank):
            model = common.build(recipe)
            opt = common.optimizer(model)
            loader = DataLoader(dataset, batch_size=common.GLOBAL_BATCH // world, shuffle=False)
            model, opt, loader = accelerator.prepare(model, opt, loader)
            losses = []
            for x, y in loader:
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                opt.step()
                losses.append(float(accelerator.gather(loss.detach()[None]).mean()))
            state = adapter_state_dict(accelerator.unwrap_model(model))
            state.update(common.evaluate(model))
            common.write_result(out, name, rank, state, {"losses": losses, "wrapper": type(model).__name__})
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
