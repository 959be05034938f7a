"""One rank of the DDP / FSDP2 tests (run by tests/test_distributed.py, or by hand):

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29500 \\
        tests/distributed/worker.py OUT_DIR lora dora ...

For every recipe given, and in one gloo world:

- ``ddp``: ``DistributedDataParallel`` over the adapted model;
- ``fsdp2``: ``fully_shard`` on each block and the root;
- ``meta``: the base model constructed on the meta device, materialized with
  ``to_empty``, its pretrained weights and a lorakit checkpoint loaded
  (``OUT_DIR/inputs``, written by the test), then ``fully_shard``.

Each trains ``STEPS`` steps on its half of every global batch and writes, per rank,
``{scenario}-{recipe}-rank{r}.safetensors`` (the whole adapter state, gathered) and
a ``.json`` (global losses, how every parameter was sharded). For ``fsdp2`` rank 0
also writes what ``gather`` gives: a lorakit checkpoint, exported factors, a PEFT export and the
merged model, to be compared with the single-process files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import lorakit.core as lk  # noqa: E402
from lorakit.core.distributed import adapter_state_dict, gather  # noqa: E402


def shard_fsdp2(model):
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def sharding(model) -> dict:
    """name -> [global shape, local shape, placement] for every parameter."""
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            placement = "Shard(0)" if p.placements[0].is_shard(0) else str(p.placements[0])
            out[name] = [list(p.shape), list(p.to_local().shape), placement]
        else:
            out[name] = [list(p.shape), list(p.shape), "replicated"]
    return out


def from_meta(recipe: str, inputs: Path):
    """Meta-device construction, then loading: nothing is initialized twice."""
    with torch.device("meta"):
        model = common.Tiny()
    model.to_empty(device="cpu")
    model.load_state_dict(load_file(str(inputs / "base.safetensors")))
    return lk.load(model, inputs / recipe)  # applies the saved recipe and loads its tensors


def write(out: Path, name: str, rank: int, model, losses: list[float]) -> None:
    state = adapter_state_dict(model)  # collective under FSDP2
    state.update(common.evaluate(model))
    common.write_result(out, name, rank, state, {"losses": losses, "sharding": sharding(model)})


def write_exports(out: Path, recipe: str, rank: int, model) -> None:
    """What rank 0 writes from a sharded model: checkpoint, export, merged weights."""
    replica = gather(model, common.build(recipe) if rank == 0 else None)
    if rank != 0:
        return
    out = out / f"files-{recipe}"
    lk.save(replica, out / "checkpoint")
    factors = lk.export_factors(replica)
    tensors = {f"{n}.{k}": v for n, e in factors.items() for k, v in (("B", e.B), ("A", e.A), ("m", e.magnitude))
               if v is not None}
    save_file(tensors, str(out / "factors.safetensors"))
    from lorakit.transformers import export_peft  # rank 0 only: transformers' import costs seconds

    export_peft(replica, out / "peft")  # PEFT's LoRA/DoRA folder, as a single process writes it
    save_file(lk.merge_and_unload(replica).state_dict(), str(out / "merged.safetensors"))


def main() -> None:
    out, recipes = Path(sys.argv[1]), sys.argv[2:]
    rank, world = common.init_process_group()
    batches = common.data()
    for recipe in recipes:
        with common.recorded(out, f"ddp-{recipe}", rank):
            ddp = DistributedDataParallel(common.build(recipe))
            write(out, f"ddp-{recipe}", rank, ddp, common.train(ddp, batches, rank, world))
        with common.recorded(out, f"fsdp2-{recipe}", rank):
            model = shard_fsdp2(common.build(recipe))
            write(out, f"fsdp2-{recipe}", rank, model, common.train(model, batches, rank, world))
            write_exports(out, recipe, rank, model)
        with common.recorded(out, f"meta-{recipe}", rank):
            model = shard_fsdp2(from_meta(recipe, out / "inputs"))
            write(out, f"meta-{recipe}", rank, model, common.train(model, batches, rank, world))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
