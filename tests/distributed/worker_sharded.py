"""One rank of the NF4 + FSDP2 and sharded-checkpoint tests (tests/test_distributed_sharded.py):

    worker_sharded.py OUT_DIR parity RECIPE...   # FSDP2 over a torchao-NF4 base: train, write
    worker_sharded.py OUT_DIR ckpt RECIPE        # rank-specific values: save_sharded, load_sharded
    worker_sharded.py OUT_DIR load RECIPE        # another world size loads ckpt's checkpoint (2 -> 4)
    worker_sharded.py OUT_DIR kill RECIPE        # rank 1 is killed (SIGKILL) in its second save

``parity`` writes ``parity-{recipe}-rank{r}.safetensors`` (the gathered adapter, eval
outputs) and ``.json`` (global losses, whether the NF4 shards kept every byte). ``ckpt``
fills every rank's local shards (adapter and AdamW state) with values of its own, saves,
loads into a zeroed model and writes what it gathered before (``expected``) and after
(``restored``); it also loads ``OUT_DIR/single`` (written by one process) into the sharded
model (1 → world), and merges on a plain NF4 replica (``merged.safetensors``). ``load`` writes
``resized-world{w}-rank{r}.safetensors``. ``kill`` leaves ``OUT_DIR/kill`` holding the first save.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import nf4  # noqa: E402

import lorakit.core as lk  # noqa: E402
from lorakit.core.distributed import adapter_state_dict, gather, load_sharded, save_full, save_sharded  # noqa: E402
from lorakit.core.layer_kinds import plain_tensors  # noqa: E402


def shard(model):
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def local_base_bytes(model) -> dict[str, torch.Tensor]:
    """Every frozen NF4 shard's inner tensors on this rank (copies)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            local = p.to_local() if isinstance(p, DTensor) else p
            out.update({f"{name}:{k}": t.clone() for k, t in plain_tensors(local).items()})
    return out


@torch.no_grad()
def evaluate(model) -> dict[str, torch.Tensor]:
    model.eval()
    x = torch.randn(8, nf4.WIDTH, generator=torch.Generator().manual_seed(3))
    out = {"eval.first": model(x), "eval.cached": model(x)}
    model.train()
    return out


def parity(out: Path, recipes: list[str], rank: int, world: int) -> None:
    for recipe in recipes:
        with common.recorded(out, f"parity-{recipe}", rank):
            model = shard(nf4.build(recipe))
            before = local_base_bytes(model)
            losses = common.train(model, nf4.data(), rank, world)
            after = local_base_bytes(model)
            unchanged = before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
            state = {**adapter_state_dict(model), **evaluate(model)}
            weight = model.blocks[0].q.base.weight
            meta = {"losses": losses, "base_unchanged": unchanged, "base_bytes": len(before),
                    "weight": [type(weight).__name__, type(weight.to_local()).__name__,
                               list(weight.to_local().shape)]}
            common.write_result(out, f"parity-{recipe}", rank, state, meta)


@torch.no_grad()
def fill_rank_specific(model, optimizer, rank: int) -> None:
    """Every local shard gets values of this rank's own; replicated tensors the same everywhere."""
    def fill(t, offset):
        local = t.to_local() if isinstance(t, DTensor) else t
        local.copy_(torch.arange(local.numel(), dtype=local.dtype).reshape(local.shape) * 1e-5 + offset)

    for key, t in model.state_dict().items():
        if ".base." not in key and key.split(".")[0] != "head":
            fill(t, 1 + rank if isinstance(t, DTensor) else 0.5)
    for state in optimizer.state.values():
        for key, t in state.items():
            if key == "step":
                t.fill_(7)
            else:
                fill(t, 2 + 10 * rank if isinstance(t, DTensor) else 0.25)


def gathered(model, optimizer) -> dict[str, torch.Tensor]:
    """Whole adapter tensors and AdamW state, by name (a collective)."""
    state = adapter_state_dict(model)
    names = {p: n for n, p in model.named_parameters()}
    for p, s in optimizer.state.items():
        for key, t in s.items():
            state[f"opt.{names[p]}.{key}"] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
    return state


def zeroed(recipe: str):
    model = nf4.build(recipe)
    with torch.no_grad():
        for layer_key, t in model.state_dict().items():
            if ".base." not in layer_key and layer_key.split(".")[0] != "head":
                t.zero_()
    return model


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def step(model, opt, rank, world):
    """One AdamW step on this rank's slice of a fixed batch (common.train's loss)."""
    x, y = common.shard(nf4.data(1)[0], rank, world)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def ckpt(out: Path, recipe: str, rank: int, world: int) -> None:
    model = shard(nf4.build(recipe))
    opt = optimizer(model)
    step(model, opt, rank, world)  # AdamW state exists
    fill_rank_specific(model, opt, rank)
    expected = gathered(model, opt)
    # the sharded merge: the adapter gathered into a plain NF4 replica on rank 0, merged there
    replica = gather(model, nf4.build(recipe) if rank == 0 else None)
    if rank == 0:
        save_file(lk.merge_and_unload(replica).state_dict(), str(out / "merged.safetensors"))
    save_full(model, out / "full")  # lorakit.core.save's files, whole, from rank 0
    try:
        lk.save(model, out / f"plain-rank{rank}")
        refused = ""
    except lk.AdapterError as error:
        refused = str(error)
    (out / f"plain-save-rank{rank}.txt").write_text(refused)
    save_sharded(model, out / "sharded", opt)
    fresh = shard(zeroed(recipe))
    fresh_opt = optimizer(fresh)
    load_sharded(fresh, out / "sharded", fresh_opt)
    restored = gathered(fresh, fresh_opt)
    step(model, opt, rank, world)  # the next step from the loaded state is the same
    step(fresh, fresh_opt, rank, world)
    after, after_fresh = adapter_state_dict(model), adapter_state_dict(fresh)
    # 1 → world: a checkpoint one process wrote
    single = shard(zeroed(recipe))
    single_opt = optimizer(single)
    load_sharded(single, out / "single", single_opt)
    from_single = gathered(single, single_opt)
    if rank == 0:
        save_file(expected, str(out / "expected.safetensors"))
        save_file(after, str(out / "next-step.safetensors"))
        save_file(after_fresh, str(out / "next-step-loaded.safetensors"))
    save_file(restored, str(out / f"restored-rank{rank}.safetensors"))
    save_file(from_single, str(out / f"from-single-rank{rank}.safetensors"))


def load(out: Path, recipe: str, rank: int, world: int) -> None:
    """Another world size reads ``ckpt``'s checkpoint (2 → world): every element, every rank."""
    model = shard(zeroed(recipe))
    opt = optimizer(model)
    load_sharded(model, out / "sharded", opt)
    save_file(gathered(model, opt), str(out / f"resized-world{world}-rank{rank}.safetensors"))
    weight = next(p for p in model.parameters() if p.requires_grad and p.shape[0] > world)
    (out / f"resized-world{world}-rank{rank}.json").write_text(json.dumps(
        {"local_rows": weight.to_local().shape[0], "rows": weight.shape[0]}))


def kill(out: Path, recipe: str, rank: int, world: int) -> None:
    model = shard(nf4.build(recipe))
    opt = optimizer(model)
    step(model, opt, rank, world)
    save_sharded(model, out / "kill", opt)
    first = gathered(model, opt)  # a collective: every rank
    if rank == 0:
        save_file(first, str(out / "kill-first.safetensors"))
    step(model, opt, rank, world)
    if rank == 1:  # SIGKILL in the middle of writing its shards of the second save
        import torch.distributed.checkpoint as dcp

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        dcp.FileSystemWriter.write_data = die
    save_sharded(model, out / "kill", opt)


def main() -> None:
    out, mode, recipes = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    rank, world = common.init_process_group()
    if mode == "parity":
        parity(out, recipes, rank, world)
    elif mode == "ckpt":
        ckpt(out, recipes[0], rank, world)
    elif mode == "load":
        load(out, recipes[0], rank, world)
    else:
        kill(out, recipes[0], rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
