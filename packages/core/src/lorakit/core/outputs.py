"""Checks of what primitives return, at apply time.

A primitive is a plugin's code: an initializer that returns NaN silently breaks
identity at init, a wrong shape or arity surfaces as a raw torch error at the first
forward. ``AdaptedLayer`` passes every output through :func:`expect` while it is
built, so the error comes at ``apply``, names the primitive and its plugin, and the
model is left unchanged (``Adapter.apply`` replaces nothing until every layer built).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .plugins import registry
from .primitives import AdapterError, Primitive, SlotsModule


def _who(primitive: Primitive) -> str:
    plugin = registry.plugin_of(primitive)
    who = f"{primitive.kind} {primitive.name!r}"
    return f"{who} (plugin {plugin!r})" if plugin else who


def expect(primitive: Primitive, what: str, value: Any, shape: tuple[int, ...] | None = None) -> Tensor:
    """``value`` must be a finite floating tensor (of ``shape`` when given)."""
    if not isinstance(value, Tensor):
        raise AdapterError(f"{_who(primitive)} returned {type(value).__name__} for {what}, not a tensor; "
                           "fix the primitive")
    if not value.is_floating_point():
        raise AdapterError(f"{_who(primitive)} returned a {value.dtype} tensor for {what}; "
                           "slots and factors are floating point")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise AdapterError(f"{_who(primitive)} returned {what} of shape {tuple(value.shape)}, "
                           f"expected {tuple(shape)}; fix the primitive")
    if not bool(torch.isfinite(value).all()):
        raise AdapterError(f"{_who(primitive)} returned non-finite values (NaN/inf) in {what}; "
                           "identity at init would not hold. Fix the primitive or its arguments")
    return value


def expect_tuple(primitive: Primitive, what: str, value: Any, n: int) -> tuple:
    if not isinstance(value, tuple | list) or len(value) != n:
        raise AdapterError(f"{_who(primitive)} returned {type(value).__name__} for {what}; "
                           f"expected a tuple of {n} tensors")
    return tuple(value)


def expect_slots_module(primitive: Primitive, value: Any) -> SlotsModule:
    """What ``Generator.build`` returns must be a :class:`SlotsModule` (an ``nn.Module``
    whose ``forward()`` gives the slot values), not a mapping of them."""
    if not isinstance(value, SlotsModule):
        raise AdapterError(f"{_who(primitive)} returned {type(value).__name__} from build(), not a SlotsModule; "
                           "build() must return a SlotsModule (e.g. ParameterSlots(slots)) whose forward() gives "
                           "the slot values")
    return value


def expect_slots(primitive: Primitive, slots: Any, wanted: Mapping[str, Tensor] | None = None) -> Any:
    r"""``slots`` maps names to tensors or :class:`Slot`\ s; with ``wanted``, it holds every
    wanted slot with its shape. Returns ``slots`` unchanged."""
    if not isinstance(slots, Mapping):
        raise AdapterError(f"{_who(primitive)} returned {type(slots).__name__} for its slots, not a mapping")
    values = {name: getattr(s, "value", s) for name, s in slots.items()}
    if wanted is not None:
        missing = sorted(set(wanted) - set(values))
        if missing:
            raise AdapterError(f"{_who(primitive)} does not return the slots {missing}; "
                               "its module's forward() must return every slot it was given")
    for name, value in values.items():
        shape = None if wanted is None or name not in wanted else tuple(wanted[name].shape)
        expect(primitive, f"slot {name!r}", value, shape)
    return slots
