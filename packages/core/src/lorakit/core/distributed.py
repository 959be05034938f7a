"""lorakit under PyTorch's own data parallelism: DDP and FSDP2 (``fully_shard``).

lorakit has no sharding of its own. An adapted model is a plain ``nn.Module``:
its adapter tensors are ordinary parameters and buffers, so
``DistributedDataParallel`` replicates it and ``fully_shard`` shards it like any
other model (OP-LoRA's MLP included). This module only adds the way back from a
wrapped or sharded model to whole tensors, for the single-process API::

    model = Adapter.from_recipe("dora", rank=8).apply(model, targets)  # before wrapping
    for block in model.layers:
        fully_shard(block)             # an AdaptedLayer or an ancestor, never the base alone
    fully_shard(model)
    ...train...
    state = adapter_state_dict(model)  # every rank calls it: shards are all-gathered
    plain = gather(model, build_plain_model() if rank == 0 else None)
    if rank == 0:
        lorakit.core.save(plain, "ckpt")            # the same files as single-process
        lorakit.core.export_factors(plain); lorakit.core.merge_and_unload(plain)

Why a plain replica for merge and export: under FSDP2 each rank holds a shard of
``W̄`` and of the factors, so a merged weight or an SVD of the update needs whole
tensors; the replica holds them once, where the files are written. See
docs/distributed.md for the launch commands and what the tests show.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .adapter import adapted_layers
from .checkpoint import adapter_state
from .primitives import AdapterError


def unwrap(model: nn.Module) -> nn.Module:
    """The adapted model inside a DDP wrapper (FSDP2 shards in place: itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor of a plain, DDP or FSDP2 model as a whole CPU tensor.

    Keys are those of ``lorakit.core.save`` (``"<module>.<slot tensor>"``), values
    are identical on every rank. Under FSDP2 this is a collective (each sharded
    tensor is all-gathered by ``DTensor.full_tensor``): call it on every rank, in
    the same order. Buffers (DoRA's row norms, DeLoRA's weight norms, residual
    factors) are never sharded and are returned as they are.
    """
    model = unwrap(model)
    if not adapted_layers(model):
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter; apply one before wrapping it")
    state = adapter_state(model)  # DTensor shards stay DTensors here
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


@torch.no_grad()
def gather(model: nn.Module, replica: nn.Module | None) -> nn.Module | None:
    """Copy the adapter of a (wrapped or sharded) ``model`` into ``replica``.

    ``replica`` is a plain single-process model built the same way (same base
    weights, same adapter applied); pass it on the rank that writes files and None
    elsewhere. Every rank must call this (it gathers shards). Returns ``replica``,
    on which ``save``, ``export_factors``, ``merge`` and ``merge_and_unload`` give
    exactly what they give on a single-process model with these tensors.
    """
    state = adapter_state_dict(model)
    if replica is None:
        return None
    expected = adapter_state(replica)
    if set(expected) != set(state):
        raise AdapterError(
            f"the replica's adapter differs from the model's: missing {sorted(set(state) - set(expected))[:5]}, "
            f"unexpected {sorted(set(expected) - set(state))[:5]}; apply the same recipe and targets to it"
        )
    for key, value in state.items():
        if expected[key].shape != value.shape:
            raise AdapterError(f"{key}: shape {tuple(value.shape)} in the model but {tuple(expected[key].shape)} "
                               "in the replica; build the replica from the same base model and rank")
    replica.load_state_dict(state, strict=False)
    return replica
