"""Optimizer parameter groups for adapted models: per-slot learning rates.

    opt = torch.optim.AdamW(param_groups(model, lr=1e-4, weight_decay=0.01,
                                         lambda_lr=1e-3, loraplus_ratio=16))

Methods want different step sizes for different slots:

- DeLoRA trains its boundary ``λ`` (slot ``lambda_``) with its own learning rate
  (DeLoRA, arXiv:2503.18225, App. D ablates the λ and B/A learning rates separately);
  ``lambda_lr`` applies to every scalar slot (``lambda_``, a learnable scale
  ``sigma``, a plugin's scalar);
- LoRA+ (Hayou et al., 2024) sets ``lr_B = ratio · lr_A`` (``loraplus_ratio``);
- ``slot_lr`` sets the learning rate of any slot by name (it wins over the above).

Weight decay applies to matrices only: scalars and vectors (``λ``, ``σ``, the
diagonal ``d``, DoRA's ``m``, biases) would be pulled towards zero — a collapsed
scale or magnitude — so they get none.

A slot is recognized by value: a parameter that an adapted layer's ``slots()``
returns as is (``Direct``, ``Diagonal``, and the slots a generator does not compute,
such as DeLoRA's ``lambda_`` under OP-LoRA's MLP). Parameters of a generator that
*computes* slots (the MLP's weights and embedding) and any other trainable
parameter of the model (a classifier head) take the base ``lr``. Each group carries a ``"name"`` key for logging.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .adapter import adapted_layers
from .primitives import AdapterError, ParameterSlots, Role


def _slot_names(model: nn.Module) -> tuple[dict[int, tuple[str, Role]], set[int], set[int]]:
    """``id(param) → (slot name, role)`` for slots held as parameters
    (``ParameterSlots``, as under ``Direct``), the ids of every other parameter of a
    ``slots`` module (a generator's own weights, such as OP-LoRA's MLP and embedding),
    and the ids of scalar slots (stored with shape (1,), see ``ParameterSlots``)."""
    names: dict[int, tuple[str, Role]] = {}
    generated: set[int] = set()
    scalars: set[int] = set()
    for layer in adapted_layers(model).values():
        generated.update(id(p) for p in layer.slots.parameters())
        for module in layer.slots.modules():
            if isinstance(module, ParameterSlots):
                for name, p in module.parameters_by_slot().items():
                    names[id(p)] = (name, module.slot_info[name].role)
                    if name in module.scalars:
                        scalars.add(id(p))
    return names, generated - set(names), scalars


def param_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                 lambda_lr: float | None = None, loraplus_ratio: float | None = None,
                 slot_lr: Mapping[str, float] | None = None) -> list[dict]:
    """Trainable parameters of ``model`` split into torch optimizer param groups.

    Groups are keyed by (learning rate, weight decay); each lists the slot names it
    holds in ``"name"``. Parameters with ``requires_grad=False`` are left out.
    """
    for label, value in (("lr", lr), ("lambda_lr", lambda_lr), ("loraplus_ratio", loraplus_ratio),
                         ("weight_decay", weight_decay), *(slot_lr or {}).items()):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < 0):
            raise AdapterError(f"param_groups: {label}={value!r} must be a number >= 0")
    slots, generated, scalars = _slot_names(model)
    groups: dict[tuple[float, float], dict] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        slot, role = slots.get(id(p), (None, None))
        label = slot or ("generator" if id(p) in generated else "other")
        rate = lr
        if slot is not None:
            if id(p) in scalars and lambda_lr is not None:
                rate = lambda_lr
            if role is Role.B and loraplus_ratio is not None:  # LoRA+ speeds up the out × r factor, by role
                rate = lr * loraplus_ratio
            if slot_lr and slot in slot_lr:
                rate = slot_lr[slot]
        decay = weight_decay if p.dim() >= 2 else 0.0
        group = groups.setdefault((rate, decay), {"params": [], "lr": rate, "weight_decay": decay,
                                                   "name": []})
        group["params"].append(p)
        if label not in group["name"]:
            group["name"].append(label)
    out = []
    for group in groups.values():
        group["name"] = "+".join(group["name"])
        out.append(group)
    return out
