"""Read the fused expert tensors of a PEFT ``target_parameters`` LoRA folder (``lora.ParamWrapper``).

PEFT adapts a fused parameter ``W (E, ·, ·)`` with one stacked pair per parameter, stored under
the owning module's name, the i-th of a module's n targeted parameters (declaration order, as
PEFT nests its wrappers) under ``base_layer.`` n−1−i times:

    <module>.[base_layer.]*lora_A.weight   (E·r, in)    A_e = rows e·r … e·r + r − 1
    <module>.[base_layer.]*lora_B.weight   (out, r·E)   B_e[:, j] = column j·E + e
    ΔW_e = s · B_e A_e,   s = alpha/r (alpha/√r with use_rslora), alpha and r per full parameter name

A 2-D parameter (``target_parameters`` of a module no layer kind adapts) is one matrix, E = 1.
``in``/``out`` are those of expert e's matrix ``W̄_e`` (``W[e]``, or ``W[e]ᵀ`` for a transposed
layout), the same as ``lorakit.core.peft_format``'s writer. Each expert becomes one update of
``peft_reader``'s form, keyed by its adapted-layer name, so both import semantics (continue the
same adapter, or merge then apply a recipe) treat an expert as any other matrix. A rank
component zero in both factors (zero padding to one rank per file) is dropped: it adds nothing
and gets no gradient, and a padded rank may exceed ``min(out, in)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from lorakit.core import AdapterError, registry
from lorakit.core.experts import (
    EXPERT_KIND,
    ExpertMatrix,
    expert_count,
    layer_name,
    parameter_kind,
    resolve_parameters,
)

WRAPPED = ".base_layer"


def expert_updates(model: nn.Module, config: dict, modules: dict[str, dict[str, Tensor]], path, peft_update,
                   pattern_value, error: type[AdapterError]):
    """``(updates, bases, modules_left, parameters)`` for the ``target_parameters`` of ``config``:
    ``updates[layer] = (EXPERT_KIND, peft_update(...))`` (r and alpha by ``pattern_value``) and ``bases[layer]`` (its
    :class:`ExpertMatrix`) per expert, the file's other modules, and the full parameter names
    to pass to ``Adapter.apply(target_parameters=)`` (None without any). One ``error`` naming
    the parameter for anything that does not fit the model; nothing is changed."""
    targets = config.get("target_parameters") or []
    if not targets:
        return {}, {}, modules, None
    try:
        found = resolve_parameters(model, list(targets), registry)
    except AdapterError as exc:
        raise error(f"{path}: {exc}; the adapter was made for another model") from None
    by_module: dict[str, list[str]] = {}
    for module_name, pname in found.values():
        by_module.setdefault(module_name, []).append(pname)
    modules, updates, bases = dict(modules), {}, {}
    for module_name, pnames in by_module.items():
        module = model.get_submodule(module_name)
        kind = parameter_kind(registry, module, pnames[0])  # resolve_parameters checked every parameter
        order = [p for p, _ in module.named_parameters(recurse=False) if p in pnames]
        for i, pname in enumerate(order):
            full, fused = f"{module_name}.{pname}", getattr(module, pname)
            key = module_name + WRAPPED * (len(order) - 1 - i)
            if key not in modules:
                raise error(f"{path}: parameter {full!r} is in target_parameters but the file has no "
                            f"'{key}.lora_A.weight'/'lora_B.weight'; the adapter was made for another model")
            parts = modules.pop(key)
            try:
                layout = kind.layout(module, pname)
            except AdapterError as exc:
                raise error(f"{path}: parameter {full!r} {tuple(fused.shape)}: {exc}") from None
            experts, r = expert_count(fused), pattern_value(config.get("rank_pattern") or {}, full, config.get("r", 8))
            A, B = parts["A"], parts["B"]
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != experts * r or B.shape[1] != A.shape[0]:
                raise error(f"{path}: parameter {full!r} has {experts} experts but the file's lora_A "
                            f"{tuple(A.shape)} / lora_B {tuple(B.shape)} are not (E·r, in) / (out, r·E) for "
                            f"E = {experts}, r = {r}; the adapter was made for a model with another expert count")
            A_e, B_e = A.reshape(experts, r, A.shape[1]), B.reshape(B.shape[0], r, experts)
            for e in range(experts):
                name = layer_name(module_name, pname, e)
                base = ExpertMatrix(module, pname, e if fused.dim() == 3 else None, layout)
                Bs, A_, m = peft_update(config, full, {"A": A_e[e], "B": B_e[:, :, e]}, EXPERT_KIND, base)
                # components zero in both factors (the writer's padding to one rank) add nothing and
                # get no gradient: dropped, so a padded rank above min(out, in) still imports
                keep = (A_.abs().amax(dim=1) > 0) | (Bs.abs().amax(dim=0) > 0)
                keep[0] |= not bool(keep.any())
                updates[name] = (EXPERT_KIND, (Bs[:, keep], A_[keep], m))
                bases[name] = base
    stray = sorted(n for n in modules if n.endswith(WRAPPED) or (n in by_module))
    if stray:
        raise error(f"{path}: tensors under {stray[:4]} belong to fused parameters that target_parameters "
                    f"{list(targets)} does not name; the adapter was made for another model")
    return updates, bases, modules, sorted(found)
