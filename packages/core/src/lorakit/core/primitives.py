"""The four kinds of primitive an adapter is composed of.

(docs/design.md, "The slot model" and "The primitive contract")

A target layer has a frozen weight ``W̄`` (out × in). Its adapter owns named
tensors, *slots*. Each :class:`Slot` declares its :class:`Role`; core, generators and
exporters ask for roles, never for names. Core creates the factor slots ``A``
(r × in), ``B`` (out × r) and ``d`` (r) from the initializer; a primitive adds its
own (DeLoRA's ``λ`` as a :attr:`Role.SCALAR`, DoRA's ``m`` as a :attr:`Role.MAGNITUDE`)
under names of its choosing.

- an :class:`Initializer` gives ``B0, d0, A0`` from ``W̄``;
- a :class:`Generator` decides which factor slots train and how they are
  parameterized; it builds a :class:`SlotsModule` returning the current slot values;
- a :class:`Normalizer` maps ``(B, d, A)`` to effective factors ``B', A'`` with
  ``ΔW = B'A'``;
- a :class:`Magnitude` head (optional) rescales the rows of ``V = W̄ + ΔW``.

Primitives are small dataclasses: their fields are their JSON arguments, which is
how checkpoints name them (registered name + arguments, never an import path).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # layer_kinds imports this module
    from .layer_kinds import FrozenWeight

KINDS = ("generator", "normalizer", "initializer", "magnitude")
#: a composition's fields and the kind of primitive each holds: the one place where the
#: field ``init`` (``Adapter(init=...)``, recipes, checkpoints) meets the kind ``initializer``
COMPOSITION_KINDS = {"generator": "generator", "normalizer": "normalizer", "init": "initializer",
                     "magnitude": "magnitude"}


class Role(enum.Enum):
    """What a slot is. Core and exporters find slots by role; names are free."""

    A = "factor A"  # r × in, from the initializer
    B = "factor B"  # out × r, from the initializer
    D = "diagonal d"  # r, from the initializer
    SCALAR = "scalar"  # a learnable scalar of a primitive (DeLoRA's λ, a learnable σ)
    MAGNITUDE = "magnitude"  # one value per output row, trained (DoRA's m)
    STATISTIC = "statistic"  # computed from W̄ once and frozen (DeLoRA's column norms)


#: the names core gives the factor slots (a normalizer reads ``s["A"]``, ``s["B"]``, ``s["d"]``)
FACTOR_NAMES = {Role.A: "A", Role.B: "B", Role.D: "d"}
FACTOR_SLOTS = tuple(FACTOR_NAMES.values())

#: ``Slot.exported_as`` of a magnitude with DoRA's meaning, ``g = m / ‖W̄ + BA‖`` per row:
#: PEFT's ``lora_magnitude_vector``. A head with any other meaning leaves it None and
#: is exported only with its magnitude folded into the factors.
DORA_MAGNITUDE = "dora-magnitude"


class AdapterError(ValueError):
    """Bad input to lorakit: the message names the module and the fix."""


class MergeError(AdapterError):
    """A merge refused because the result would not be finite; the base is unchanged."""


@dataclass
class Slot:
    """Initial value of a slot, whether the optimizer sees it, and what it is."""

    value: Tensor
    trainable: bool
    role: Role = Role.STATISTIC
    exported_as: str | None = None  # a standard layout that carries it as is (DORA_MAGNITUDE)


class Primitive:
    """Base of every primitive. Subclasses are dataclasses with JSON-able fields."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def config(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def spec(self) -> dict:
        return {"name": self.name, "args": self.config()}


class Initializer(Primitive):
    kind = "initializer"

    def factors(
        self, weight: Tensor, rank: int, scale: float, rng: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(B0, d0, A0)`` in ``weight``'s dtype.

        ``weight`` is ``W̄`` (out × in, fp32 or fp64); ``scale`` is the normalizer's
        initial scale ``s`` so an initializer that wants ``s·B0A0`` to equal a given
        matrix can compensate for it.
        """
        raise NotImplementedError


class Normalizer(Primitive):
    kind = "normalizer"

    def slots(self, weight: Tensor, rank: int) -> dict[str, Slot]:
        """Slots this normalizer owns (e.g. a learnable λ, cached weight norms)."""
        return {}

    def slots_at_init(self, weight: Tensor, rank: int, factors: Mapping[str, Tensor]) -> dict[str, Slot]:
        """Like :meth:`slots`, for a normalizer whose frozen statistics depend on the initial
        factors (``factors``: the initializer's ``A``, ``B``, ``d``). Core calls this one;
        :meth:`factors` then only reads its slots, never fills them."""
        return self.slots(weight, rank)

    def initial_scale(self, rank: int) -> float:
        return 1.0

    def factors(self, s: Mapping[str, Tensor], rank: int) -> tuple[Tensor, Tensor]:
        """Effective ``(B', A')`` from the current slot values ``s``."""
        raise NotImplementedError


class Magnitude(Primitive):
    kind = "magnitude"
    #: what the head needs from W̄ besides the operator ``row_scale`` gets: its row norms
    #: ``‖W̄_i‖²``, which core then computes once at apply and keeps with the adapter (one
    #: read of a quantized weight per layer, not per step). DoRA's normalization needs them;
    #: a plain gain does not, and gets ``row_sq_norm=None``.
    uses_row_norms: ClassVar[bool] = True

    def slots(self, weight: Tensor, row_sq_norm: Tensor | None) -> dict[str, Slot]:
        """Slots of the head, e.g. DoRA's ``m``; ``row_sq_norm`` is ``‖W̄_i‖²``."""
        return {}

    def row_scale(
        self, s: Mapping[str, Tensor], weight: FrozenWeight, row_sq_norm: Tensor | None, B: Tensor, A: Tensor
    ) -> Tensor:
        """Per-output-row multiplier ``g`` with ``W_eff = diag(g)·(W̄ + B A)``."""
        raise NotImplementedError


class Generator(Primitive):
    kind = "generator"

    #: trainability of the factor slots A, B, d under this generator
    trainable_factors: ClassVar[Mapping[str, bool]] = {"A": True, "B": True, "d": False}

    def build(self, slots: Mapping[str, Slot], rng: torch.Generator) -> SlotsModule:
        """A :class:`SlotsModule` whose ``forward()`` returns ``{slot name: current value}``."""
        raise NotImplementedError

    def build_for_load(self, slots: Mapping[str, Slot], rng: torch.Generator) -> SlotsModule:
        """:meth:`build` for a checkpoint load (``lorakit.core.load``), which then overwrites
        every tensor in the module's ``state_dict``: a generator whose ``build`` draws or
        computes much (OP-LoRA's MLP init) may return the same structure holding finite
        placeholders instead. Only for modules whose every tensor is in the state dict (no
        non-persistent buffer). Default: :meth:`build`."""
        return self.build(slots, rng)


@dataclass(frozen=True)
class Composition:
    """The primitives of one adapter, which every adapted layer is built from."""

    generator: Generator
    normalizer: Normalizer
    init: Initializer
    magnitude: Magnitude | None = None


@dataclass(frozen=True)
class SlotInfo:
    """A slot's declaration without its value (what a built module remembers)."""

    role: Role
    trainable: bool
    exported_as: str | None = None


class SlotsModule(nn.Module):
    """What :meth:`Generator.build` returns: ``forward()`` gives ``{slot name: value}``.

    The base records the declaration of every slot it was built from, so core and the
    conformance kit ask which slots train and which slot has a role instead of reading
    attributes or knowing names. Rule: at step 0 the outputs equal the initial values;
    slots declared frozen never change.
    """

    def __init__(self, slots: Mapping[str, Slot]):
        super().__init__()
        self.slot_info = {name: SlotInfo(slot.role, slot.trainable, slot.exported_as)
                          for name, slot in slots.items()}

    def trainable_slots(self) -> frozenset[str]:
        """Names of the slots training changes (as declared when built)."""
        return frozenset(name for name, info in self.slot_info.items() if info.trainable)

    def names_with(self, role: Role) -> list[str]:
        """Names of the slots with ``role``, in declaration order."""
        return [name for name, info in self.slot_info.items() if info.role is role]

    def forward(self) -> dict[str, Tensor]:
        raise NotImplementedError


class ParameterSlots(SlotsModule):
    """Slots held as plain tensors: trainable ones as parameters, the rest as buffers.

    This is the ``Direct`` parameterization and the storage every other generator
    falls back on for the slots it does not generate.
    """

    def __init__(self, slots: Mapping[str, Slot]):
        super().__init__(slots)
        self.names = tuple(slots)
        # FSDP2 (fully_shard) shards parameters along dim 0 and refuses 0-dim ones:
        # a trainable scalar (DeLoRA's λ, a learnable σ) is stored with shape (1,)
        # and handed out as a 0-dim view, so the math still sees a scalar.
        self.scalars = frozenset(n for n, s in slots.items() if s.trainable and s.value.dim() == 0)
        for name, slot in slots.items():
            value = slot.value.detach().clone()
            if slot.trainable:
                self.register_parameter(name, nn.Parameter(value.reshape(1) if name in self.scalars else value))
            else:
                self.register_buffer(name, value)

    def parameters_by_slot(self) -> dict[str, nn.Parameter]:
        """The trainable slots' parameters, by slot name."""
        return {n: getattr(self, n) for n in self.names if isinstance(getattr(self, n), nn.Parameter)}

    def forward(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).view(()) if name in self.scalars else getattr(self, name)
                for name in self.names}
