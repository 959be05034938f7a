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
tensors; the replica holds them once, where the files are written. DeepSpeed ZeRO-3
(its parameters are ``Size([0])`` outside the forward) is gathered the same way by
``adapter_state_dict``; ``save_full(model, path)`` writes ``save``'s files from any of
them (every rank calls it, rank 0 writes). See docs/distributed.md for the launch
commands and what the tests show.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from . import atomic, schema
from .adapter import Adapter, adapted_layers, adapter_config
from .checkpoint import adapter_state
from .checkpoint import save as checkpoint_save
from .primitives import AdapterError


def unwrap(model: nn.Module) -> nn.Module:
    """The adapted model inside a DDP or DeepSpeed engine wrapper (FSDP2 shards in place: itself)."""
    if isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        inner = model.module
        assert isinstance(inner, nn.Module)
        return inner
    return model


def _zero3_partitioned(model: nn.Module, keys) -> list[nn.Parameter]:
    """The adapter's parameters that DeepSpeed ZeRO-3 partitioned (each rank holds a flat
    piece in ``ds_tensor``; the parameter itself is ``Size([0])`` outside the forward)."""
    return [p for n, p in model.named_parameters() if n in keys and hasattr(p, "ds_id")]


def _whole_adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """``adapter_state`` with ZeRO-3 partitions gathered (a collective when there are any)."""
    if not (partitioned := _zero3_partitioned(model, set(adapter_state(model, copy=False)))):
        return adapter_state(model)
    import deepspeed  # only here: a model holding ZeRO-3 parameters came from it

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return adapter_state(model)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor of a plain, DDP, FSDP2 or DeepSpeed (ZeRO-3) model as a whole CPU tensor.

    Keys are those of ``lorakit.core.save`` (``"<module>.<slot tensor>"``), values
    are identical on every rank. Under FSDP2 or DeepSpeed ZeRO-3 this is a collective
    (each sharded tensor is all-gathered by ``DTensor.full_tensor``, ZeRO-3 partitions by
    ``deepspeed.zero.GatheredParameters``): call it on every rank, in the same order.
    Buffers (DoRA's row norms, DeLoRA's weight norms, residual factors) are never
    sharded and are returned as they are.
    """
    model = unwrap(model)
    if not adapted_layers(model):
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter; apply one before wrapping it")
    state = _whole_adapter_state(model)  # DTensor shards stay DTensors here
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


def is_sharded(model: nn.Module) -> bool:
    """Whether any adapter tensor of ``model`` is an FSDP2 shard or a ZeRO-3 partition."""
    model = unwrap(model)
    state = adapter_state(model, copy=False)
    return any(isinstance(v, DTensor) for v in state.values()) or bool(_zero3_partitioned(model, set(state)))


def save_full(model: nn.Module, path: str | os.PathLike) -> Path | None:
    """``lorakit.core.save``'s files from a plain, DDP, FSDP2 or ZeRO-3 model: every rank
    calls it (it gathers the shards), rank 0 writes them (atomically, as ``save``) and returns
    the path; the other ranks return None. The files equal a single-process ``save`` of
    the same values. For resuming a sharded run with its optimizer, see :func:`save_sharded`."""
    state = adapter_state_dict(model)
    written, failed = None, None
    if _rank() == 0:
        try:
            written = checkpoint_save(unwrap(model), path, tensors=state)
        except (AdapterError, OSError) as error:
            failed = str(error)
    # no rank returns before rank 0 published the folder, and its failure is every rank's
    if failed := _same_on_every_rank(failed):
        raise AdapterError(failed)
    return written


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


# -- sharded checkpoints: adapter + optimizer, every rank writes its own shards -------------

SHARDED_CONFIG = "lorakit_sharded.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _same_on_every_rank(value):
    """Rank 0's ``value`` on every rank (a folder name, an error text)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's own adapter tensors (DTensor shards under FSDP2), by ``save``'s keys: what
    DCP writes from and loads into in place."""
    keys = set(adapter_state(model))
    return {k: v for k, v in model.state_dict().items() if k in keys}


def _config(model: nn.Module) -> dict:
    return {"format": "lorakit-sharded", "format_version": 1,
            "adapter": {k: v for k, v in adapter_config(model).items() if k in schema.fields_of(Adapter)}}


def save_sharded(model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write the adapter (and ``optimizer``'s state) of a plain, DDP or FSDP2 model to the
    folder ``path`` with ``torch.distributed.checkpoint``: every rank writes its own shards,
    nothing is gathered. A collective: call it on every rank.

    Atomic as a whole, as :func:`lorakit.core.save`: the ranks write into one hidden
    staging folder that rank 0 publishes (two renames) only after every rank's files
    and DCP's metadata are complete; a kill of any rank at any moment leaves the
    previous checkpoint at ``path``. :func:`load_sharded` reads it at any world size."""
    model = unwrap(model)
    if not adapted_layers(model):
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter to save")
    path = Path(os.path.realpath(path))
    folder = None
    if _rank() == 0:
        atomic.recover(path)  # a save killed mid-swap: reinstate the previous checkpoint first
        folder = atomic.staging_folder(path)
    folder = Path(_same_on_every_rank(str(folder)))
    try:
        state: dict[str, Any] = {"adapter": _adapter_tensors(model)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), no_dist=not dist.is_initialized())
        if _rank() == 0:
            (folder / SHARDED_CONFIG).write_text(json.dumps(_config(model), indent=2, sort_keys=True))
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk before the folder is published
        failed = None
        if _rank() == 0:
            try:
                atomic.publish(folder, path)
            except OSError as error:
                failed = f"{path}: publishing the checkpoint failed ({error}); the previous one is kept"
        # every rank returns only once the checkpoint is at `path` (a load right after
        # save_sharded on another rank would find the previous one, or none)
        if failed := _same_on_every_rank(failed):
            raise AdapterError(failed)
    finally:
        if _rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)  # gone already once published
    return path


def _check_sharded(model: nn.Module, folder: Path, optimizer) -> None:
    """One clear error, before anything is loaded, when the checkpoint does not fit."""
    config_file = folder / SHARDED_CONFIG
    if not config_file.is_file():
        raise AdapterError(f"{folder} is not a lorakit sharded checkpoint (no {SHARDED_CONFIG}); write it with "
                           "lorakit.core.distributed.save_sharded, or read a lorakit.core.save folder with "
                           "lorakit.core.load")
    saved = json.loads(config_file.read_text())
    ours = json.loads(json.dumps(_config(model)))["adapter"]  # as the file holds it (lists, not tuples)
    theirs = saved.get("adapter", {})
    if differ := sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)):
        raise AdapterError(f"{folder}: the checkpoint's adapter differs from the model's in {', '.join(differ)}; "
                           "apply the recipe the checkpoint was trained with before load_sharded")
    meta = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    # tensor entries carry a size (bytes entries do not: none is an adapter tensor)
    stored = {k.removeprefix("adapter."): tuple(getattr(v, "size", ())) for k, v in meta.items()
              if k.startswith("adapter.")}
    expected = {k: tuple(v.shape) for k, v in _adapter_tensors(model).items()}
    if set(stored) != set(expected):
        raise AdapterError(f"{folder}: adapter tensors missing {sorted(set(expected) - set(stored))[:5]}, "
                           f"unexpected {sorted(set(stored) - set(expected))[:5]}; apply the same targets")
    if (bad := [k for k in expected if stored[k] != expected[k]]):
        raise AdapterError(f"{folder}: {bad[0]} is {stored[bad[0]]} in the checkpoint but {expected[bad[0]]} "
                           "in the model; build it from the same base model and rank")
    if optimizer is not None and not any(k.startswith("optimizer.") for k in meta):
        raise AdapterError(f"{folder} holds no optimizer state (saved without one); load it with optimizer=None")


def load_sharded(model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a :func:`save_sharded` folder into ``model`` (adapted with the same recipe and
    targets; plain, DDP or FSDP2, at any world size: DCP reads each rank's slices) and
    ``optimizer``. In place; a collective under a process group. Mismatches are one
    :class:`AdapterError` before anything is read."""
    model = unwrap(model)
    folder = atomic.readable(path)
    _check_sharded(model, folder, optimizer)
    state: dict[str, Any] = {"adapter": _adapter_tensors(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)  # initializes the state to load into
    dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=not dist.is_initialized())
    model.load_state_dict(state["adapter"], strict=False)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
