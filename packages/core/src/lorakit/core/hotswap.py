"""Hot-swap: replace an adapter's tensors in place, so a model compiled once serves many adapters.

    model = Adapter.from_recipe("lora", rank=8, max_rank=64).apply(base, targets=[...])
    fast = torch.compile(model)
    hotswap(model, "runs/v2/checkpoint-500")      # a native checkpoint, rank <= 64
    hotswap(model, "peft_adapter/")               # or a PEFT LoRA/DoRA folder

``torch.compile`` guards on every tensor's shape and on the Python ints a forward reads
(the layer's ``rank``), so an adapter of another rank would recompile. ``Adapter(max_rank=R)``
builds every layer at its rank ``r`` and zero-pads it to ``R`` (:func:`pad_layer`):

    A = [A_r; 0]    B = [B_r, 0]    d = [d_r · s(r)/s(R), 0]    B0', A0' padded the same way

and the layer computes at rank ``R``: ``s(R) B diag(d) A = s(r) B_r diag(d_r) A_r`` (``s`` the
scale normalizer's ``alpha/r`` or ``alpha/√r``; ``s(r)/s(R) = 1`` for ``alpha = r``, so the
update, and identity at init, are exact), and a zero residual component gives an exactly zero
column (``functional.residual_factors``). :func:`hotswap` then only ``copy_``s values into
tensors of fixed shapes: no guard changes, no recompile.

Padding needs slots held as they are (``ParameterSlots``: the direct, LoRA-FA, diagonal
generators) and the scale normalizer, core's LoRA baseline (lora, rslora, dora, pissa, olora,
loldu, lora-fa); any other composition is refused at apply, naming why. A source must be of
the same adapter (composition, recipe, dtype) on the same modules; its rank and seed may differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from . import schema
from .adapter import Adapter, adapted_layers, adapter_config
from .layer import AdaptedLayer
from .lora import Scale
from .primitives import AdapterError, ParameterSlots, Role, Slot
from .validation import loads_strict, read_regular_file

#: adapter fields a source may differ in: they drew, sized, placed or named the values (a recipe name
#: is a label: its composition is compared)
FREE_FIELDS = frozenset({"rank", "rank_pattern", "seed", "max_rank", "dropout", "exclude", "layers", "recipe"})
_RESIDUAL = ("residual_B", "residual_A")
Source = dict[str, tuple[int, dict[str, Tensor]]]  # module -> (rank, {state key in the layer: value})


def _why_not_paddable(layer: AdaptedLayer) -> str | None:
    if type(layer.slots) is not ParameterSlots:
        return (f"its generator makes its slots ({type(layer.slots).__name__}), so they cannot be zero-padded; "
                "hot-swap needs slots held as they are (direct, lora-fa, diagonal generators)")
    if not isinstance(layer.normalizer, Scale):
        return (f"its normalizer {layer.normalizer.name!r} is not lorakit's scale normalizer, whose update keeps "
                "its value when zero-padded; hot-swap serves lora, rslora, dora, pissa, olora, loldu, lora-fa")
    return None


def _ratio(layer: AdaptedLayer, rank: int, max_rank: int) -> float:
    """``s(rank) / s(max_rank)``: the factor ``d`` takes so that the update keeps its value."""
    norm = layer.normalizer
    return 1.0 if getattr(norm, "learnable", False) else norm.initial_scale(rank) / norm.initial_scale(max_rank)


def padded(values: Mapping[str, Tensor], roles: Mapping[str, Role], rank: int, max_rank: int,
           ratio: float) -> dict[str, Tensor]:
    """Slot values of rank ``rank`` zero-padded to ``max_rank`` (``residual_*`` too); ``d``
    scaled by ``ratio`` (pure: the inputs are not changed)."""
    k = max_rank - rank
    out = {}
    for name, v in values.items():
        role = roles.get(name) or {"residual_B": Role.B, "residual_A": Role.A}.get(name)
        if role is Role.A:
            v = torch.cat([v, v.new_zeros(k, v.shape[1])], dim=0)
        elif role is Role.B:
            v = torch.cat([v, v.new_zeros(v.shape[0], k)], dim=1)
        elif role is Role.D:
            v = torch.cat([v * ratio if ratio != 1.0 else v, v.new_zeros(k)])
        out[name] = v
    return out


def pad_layer(layer: AdaptedLayer, max_rank: int, name: str = "") -> AdaptedLayer:
    """Zero-pad ``layer`` (built at its rank) to ``max_rank`` in place: same function, fixed
    shapes for :func:`hotswap`. Called by ``Adapter.apply`` for ``Adapter(max_rank=...)``."""
    where = f"module {name!r}" if name else "the layer"
    if (why := _why_not_paddable(layer)) is not None:
        raise AdapterError(f"max_rank: {where} cannot be padded for hot-swap: {why}")
    if not layer.rank <= max_rank <= min(layer.shape):
        raise AdapterError(f"max_rank={max_rank}: {where} ({layer.shape[0]}x{layer.shape[1]}) has rank "
                           f"{layer.rank}; max_rank must be between its rank and min(out, in) = {min(layer.shape)}")
    info = layer.slots.slot_info
    with torch.no_grad():
        values = {n: v.detach() for n, v in layer.slots().items()}
        residual = {n: getattr(layer, n) for n in _RESIDUAL if layer.residual}
        new = padded({**values, **residual}, {n: i.role for n, i in info.items()}, layer.rank, max_rank,
                     _ratio(layer, layer.rank, max_rank))
    layer.slots = ParameterSlots({n: Slot(new[n], info[n].trainable, info[n].role, info[n].exported_as)
                                  for n in values}).to(next(iter(values.values())).device)
    for n in residual:
        setattr(layer, n, new[n].contiguous())
    layer.rank = max_rank
    return layer


def _layer_tensors(layer: AdaptedLayer) -> dict[str, Tensor]:
    """The tensors a swap writes, by state key within the layer (``slots.A``, ``residual_B``)."""
    state = {f"slots.{n}": t for n, t in [*layer.slots.named_parameters(), *layer.slots.named_buffers()]}
    state.update({n: getattr(layer, n) for n in _RESIDUAL if layer.residual})
    return state


def _native(path: Path, layers: dict[str, AdaptedLayer], model: nn.Module) -> Source:
    """``{module: (rank, {state key: value})}`` from a lorakit checkpoint."""
    from .checkpoint import WEIGHTS, _read_tensors, read_config

    config, tensors = read_config(path), _read_tensors(path / WEIGHTS)
    ours = adapter_config(model)
    fields = {n: s for n, s in schema.fields_of(Adapter).items() if n not in FREE_FIELDS}
    differ = sorted(n for n, spec in fields.items()
                    if json.dumps(ours.get(n), sort_keys=True)
                    != json.dumps(config["adapter"].get(n, spec.file_default), sort_keys=True))
    if differ:
        raise AdapterError(f"hotswap {path}: its adapter differs from the model's in {differ}; a swap keeps the "
                           "model's composition: load it into a fresh model (lorakit.core.load) instead")
    if set(config["modules"]) != set(layers):
        theirs = set(config["modules"])
        raise AdapterError(f"hotswap {path}: its targets differ (only in it: {sorted(theirs - set(layers))[:5]}, "
                           f"only in the model: {sorted(set(layers) - theirs)[:5]}); a swap "
                           "keeps the model's targets: apply an adapter with these targets instead")
    out = {}
    for name, info in config["modules"].items():
        keys = _layer_tensors(layers[name])
        found = {k: tensors[f"{name}.{k}"] for k in keys if f"{name}.{k}" in tensors}
        if set(found) != set(keys):
            raise AdapterError(f"hotswap {path}: module {name!r} lacks {sorted(set(keys) - set(found))} (its residual "
                               "or slots differ from the model's); it was saved by another recipe")
        out[name] = (info["rank"], found)
    return out


def _source(source: str | os.PathLike, layers: dict[str, AdaptedLayer], model: nn.Module) -> Source:
    path = Path(source)
    try:  # untrusted: a bounded regular file, strict JSON
        head = loads_strict(read_regular_file(path / "adapter_config.json", 2**24), str(path))
    except (OSError, AdapterError):
        head = None
    if isinstance(head, dict) and "peft_type" in head:
        from .hotswap_peft import peft_source

        return peft_source(path, layers, model)
    if not (isinstance(head, dict) and head.get("format") == "lorakit"):
        raise AdapterError(f"hotswap {path}: not a lorakit checkpoint nor a PEFT LoRA folder (no readable "
                           "adapter_config.json with \"format\": \"lorakit\" or \"peft_type\"); give one of those")
    return _native(path, layers, model)


def hotswap(model: nn.Module, source: str | os.PathLike) -> nn.Module:
    """Replace ``model``'s adapter values with ``source``'s (a native checkpoint folder or a PEFT
    LoRA folder) in place; a ``torch.compile``d model does not recompile. Every module and tensor
    is checked before anything is written: on error the model is unchanged."""
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter; apply one (Adapter(max_rank=...)) first")
    if any(layer.merged for layer in layers.values()):
        raise AdapterError("hotswap: the adapter is merged; unmerge(model) first")
    plan = {}
    for name, (rank, values) in _source(source, layers, model).items():
        layer = layers[name]
        if rank != layer.rank and (why := _why_not_paddable(layer)) is not None:
            raise AdapterError(f"hotswap {source}: module {name!r} has rank {layer.rank}, the source {rank}, and "
                               f"{why}")
        if rank > layer.rank:
            raise AdapterError(f"hotswap {source}: module {name!r} has rank {rank} in the source, above the model's "
                               f"max_rank {layer.rank}; apply with Adapter(max_rank={rank}) or more")
        info = layer.slots.slot_info
        roles = {f"slots.{n}": i.role for n, i in info.items()}
        new = padded(values, roles, rank, layer.rank, _ratio(layer, rank, layer.rank) if rank != layer.rank else 1.0)
        for key, t in _layer_tensors(layer).items():
            v = new[key]
            if v.shape != t.shape or v.dtype != t.dtype:
                raise AdapterError(f"hotswap {source}: module {name!r} {key} is {tuple(v.shape)} {v.dtype} in the "
                                   f"source, the model needs {tuple(t.shape)} {t.dtype}: made for another model")
            if not bool(torch.isfinite(v).all()):
                raise AdapterError(f"hotswap {source}: module {name!r} {key} has non-finite values (NaN/inf); the "
                                   "source is corrupt or from a diverged run: use an earlier checkpoint")
            plan[(name, key)] = (t, v)
    with torch.no_grad():
        for t, v in plan.values():
            t.copy_(v)
    return model
