"""Whole-model operations on an adapted model: merge, disable, report, export factors."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapter import adapted_layers, adapter_config, replace_adapter_config
from .experts import unwrap_parameters
from .functional import reduce_dense, reduce_lowrank
from .lora import Direct
from .primitives import DORA_MAGNITUDE, AdapterError, MergeError, ParameterSlots, Role, Slot
from .trained import saved_modules, unwrap_saved
from .validation import check_finite_tensors


def _layers(model: nn.Module):
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter; call Adapter(...).apply(model) first")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (computed in fp32, cast back): all layers or none.

    Every layer is checked first (``AdaptedLayer.check_merge``: a bound on ``|W_eff|`` from
    one reduction over ``W̄``; ``W_eff`` itself only where the bound does not settle it),
    keeping its factors; then each ``W_eff`` is computed once and written, so one out × in
    matrix is held at a time. A :class:`MergeError` names the module and leaves every base
    weight unchanged.
    """
    layers = {n: layer for n, layer in _layers(model).items() if not layer.merged}
    for name, layer in layers.items():
        if layer.kind.quantized:
            raise MergeError(
                f"merge refused: module {name!r} is a quantized {type(layer.base).__name__}; writing W_eff into it "
                "would requantize (adding quantization error) and unmerge could not restore W. Use "
                "merge_and_unload(model) for a float model (dequantized W + update), or "
                "merge_and_unload(model, requantize=True) to requantize and get the added error reported.")
    _merge_layers(layers)
    return model


def _merge_layers(layers: dict, plans: dict | None = None) -> None:
    """Check every layer (or take its ``check_merge`` plan), then write them all; a failure
    while writing (Ctrl-C, out of memory) unmerges the ones written."""
    if plans is None:  # every layer first: all or nothing
        plans = {name: layer.check_merge(name) for name, layer in layers.items()}
    done = []
    try:
        for name, layer in layers.items():
            layer.merge(name, plans[name])
            done.append(layer)
    except BaseException:  # Ctrl-C mid-way: back to all unmerged
        for layer in done:
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> nn.Module:
    for layer in _layers(model).values():
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Put the base modules back (unmerged: the pretrained model)."""
    for name, layer in _layers(model).items():
        layer.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    unwrap_parameters(model)  # fused expert tensors: their module back in place
    unwrap_saved(model, keep="original")
    return model


def merge_and_unload(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """A plain model with the adaptation baked into its weights: all layers or none.

    A quantized base cannot hold ``W_eff`` in place: each such module is replaced by
    the kind's float module (``nn.Linear`` in the compute dtype holding dequantized
    ``W̄`` + update), with a warning saying so. ``requantize=True`` instead writes
    ``W_eff`` back into the quantized format and reports the error that adds
    (``model.lorakit_merge_report``).

    Order: every float layer's merge is checked; every quantized layer's replacement is
    built (or requantized, its old storage kept); then the float layers merge and the
    modules are swapped. Any exception (a :class:`MergeError`, ``MemoryError``, Ctrl-C)
    puts the model back as it was: quantized storage bit-identical, float weights
    unmerged (exact unless the float merges had begun, then to within rounding, as
    :func:`unmerge`). Peak memory: the new modules and the old quantized storage together.
    """
    layers = _layers(model)
    quantized = {n: layer for n, layer in layers.items() if layer.kind.quantized and not layer.merged}
    floats = {n: layer for n, layer in layers.items() if not layer.merged and n not in quantized}
    plans = {name: layer.check_merge(name) for name, layer in floats.items()}  # cheap bound, nothing written
    modules, report, kept, swapped, merged = {}, {}, {}, [], False
    saved = saved_modules(model)
    try:
        for name, layer in quantized.items():
            W_eff = layer.merged_weight(name)[0]
            if requantize:
                kept[name] = layer.kind.quantized_state(layer.base)
                report[name] = layer.kind.requantize(layer.base, W_eff)
            else:
                modules[name] = layer.kind.float_module(layer.base, W_eff)
                report[name] = {"merged_into": f"{type(modules[name]).__name__}({W_eff.dtype})"}
            del W_eff
        _merge_layers(floats, plans)  # all or none itself
        merged = True
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, modules.get(name, layer.base))
            swapped.append(name)
        unwrap_parameters(model)
        unwrap_saved(model, keep="trained")
    except BaseException:
        for name, module in saved.items():  # modules_to_save wrappers back in place
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        for name in swapped:  # the adapted layers back in place
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layers[name])
        if merged:
            for layer in floats.values():
                layer.unmerge()
        for name, state in kept.items():
            quantized[name].kind.restore_quantized_state(quantized[name].base, state)
        raise
    if quantized:
        import warnings

        what = ("requantized in place; max abs error added per module in model.lorakit_merge_report" if requantize
                else "replaced by float modules holding dequantized W + update (the model is no longer quantized)")
        warnings.warn(f"merge_and_unload: {len(quantized)} quantized module(s) {what}", stacklevel=2)
        setattr(model, "lorakit_merge_report", report)  # noqa: B010 (typed Module)
    return model


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in [*_layers(model).values(), *saved_modules(model).values()]:
        layer.disabled = not enabled


@contextlib.contextmanager
def disabled(model: nn.Module):
    """``with disabled(model):`` runs the base model."""
    states = {n: layer.disabled for n, layer in {**_layers(model), **saved_modules(model)}.items()}
    set_enabled(model, False)
    try:
        yield model
    finally:
        for name, layer in {**adapted_layers(model), **saved_modules(model)}.items():
            layer.disabled = states[name]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def parameter_report(model: nn.Module) -> dict:
    """Counts of trainable and total parameters, with a per-slot breakdown."""
    total = sum(p.numel() for p in model.parameters())
    trainable = trainable_parameters(model)
    per_slot: dict[str, int] = {}
    for name, p in trainable.items():
        key = name.rsplit(".", 1)[-1]
        per_slot[key] = per_slot.get(key, 0) + p.numel()
    n = sum(p.numel() for p in trainable.values())
    return {"trainable": n, "total": total, "percent": 100.0 * n / max(total, 1), "per_slot": per_slot}


def freeze_generators(model: nn.Module) -> nn.Module:
    """Evaluate every generator once and keep only its outputs as plain slots.

    OP-LoRA's MLP is discarded here; what remains is a ``direct`` adapter with
    the same output. Trainability of each generated slot is kept.
    """
    for layer in _layers(model).values():
        if isinstance(layer.slots, ParameterSlots):
            continue
        with torch.no_grad():
            values = layer.slots()
        info = layer.slots.slot_info
        layer.slots = ParameterSlots({n: Slot(v, info[n].trainable, info[n].role, info[n].exported_as)
                                      for n, v in values.items()})
    if adapter_config(model):
        replace_adapter_config(model, generator=Direct().spec())
    return model


@dataclass
class ExportedLayer:
    """``W_eff − W̄ = B A`` (and ``W_eff = diag(m/‖W̄ + BA‖)(W̄ + BA)`` with DoRA)."""

    B: Tensor
    A: Tensor
    magnitude: Tensor | None
    rel_error: float


@torch.no_grad()
def _check_finite_adapter(model: nn.Module) -> None:
    # a diverged adapter would export NaN factors that load silently elsewhere
    check_finite_tensors(((f"{name}.{key}", value) for name, layer in _layers(model).items()
                          for key, value in layer.state_dict().items() if not key.startswith("base.")),
                         "export refused")


def check_export_options(max_rank: int | str | None, energy: float) -> None:
    """Raise :class:`AdapterError` for a ``max_rank`` / ``energy`` no export can honour."""
    if max_rank is not None and max_rank != "auto" and (
            not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1):
        raise AdapterError(f"export max_rank={max_rank!r}: give an integer >= 1, 'auto', or None to export exactly")
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise AdapterError(f"export energy={energy!r}: give the fraction of the update's energy to keep, in (0, 1]")


@torch.no_grad()
def folded_update(layer) -> Tensor:
    """``W_eff − W̄ = g ⊙ (W̄ + B A) − W̄ = (g−1) ⊙ W̄ + g ⊙ B A`` in fp64: a magnitude
    head written as a plain additive update, for clients without DoRA. Full rank in
    general (the ``(g−1) ⊙ W̄`` term); built in place, one out × in matrix."""
    B, A, g = layer.factors()
    W = layer.kind.matrix(layer.base)
    D = W.to(torch.float64, copy=True)
    D.addmm_(B.to(torch.float64), A.to(torch.float64))
    D.mul_(g.to(torch.float64)[:, None])
    return D.sub_(W)


def _exported_magnitude(name: str, layer) -> Tensor:
    """The magnitude slot a standard layout carries as is (DoRA's ``m``), by its declaration."""
    names = [n for n in layer.slots.names_with(Role.MAGNITUDE)
             if layer.slots.slot_info[n].exported_as == DORA_MAGNITUDE]
    if not names:
        raise AdapterError(f"module {name!r}: magnitude head {layer.magnitude.name!r} has no slot with DoRA's "
                           "meaning to export; export with fold_magnitude=True (a plain LoRA of W_eff − W̄)")
    return layer.slots()[names[0]].detach().clone()


@torch.no_grad()
def export_factors(model: nn.Module, rank: int | None = None, *, max_rank: int | str | None = None,
                   energy: float = 0.999, fold_magnitude: bool = False) -> dict[str, ExportedLayer]:
    """Each adapted layer's total update as standard low-rank factors.

    The residualized update ``B'A' − B0'A0'`` has rank ≤ 2r; it is reduced
    exactly (QR + small SVD). ``rank`` truncates to exactly ``rank`` (zero-padded);
    ``max_rank=k`` to at most ``k``; ``max_rank="auto"`` per module to the fewest
    directions holding ``energy`` of ``‖ΔW‖²``. Each reports its relative error.
    With a magnitude head, the factors are ``V − W̄`` and the magnitude is ``m``,
    which is PEFT's DoRA parameterization exactly; ``fold_magnitude=True`` instead
    writes the whole ``W_eff − W̄`` (:func:`folded_update`) as plain factors, layer by
    layer, exact at full rank.
    """
    check_export_options(max_rank, energy)
    _check_finite_adapter(model)
    out = {}
    for name, layer in _layers(model).items():
        if layer.merged:
            raise AdapterError(f"module {name!r} is merged; unmerge(model) before exporting")
        if layer.disabled:
            raise AdapterError(f"module {name!r} is disabled; enable it before exporting")
        B, A, _ = layer.factors()
        if fold_magnitude and layer.magnitude is not None:
            B_k, A_k, err = reduce_dense(folded_update(layer), rank if rank is not None else max_rank, energy)
            out[name] = ExportedLayer(B_k.to(A.dtype), A_k.to(A.dtype), None, err)
            continue
        B_k, A_k, err = reduce_lowrank(B, A, rank, max_rank=max_rank, energy=energy)
        m = None if layer.magnitude is None else _exported_magnitude(name, layer)
        out[name] = ExportedLayer(B_k, A_k, m, err)
    return out
