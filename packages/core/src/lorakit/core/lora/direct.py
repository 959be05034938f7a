"""``Direct``: every trainable slot is a plain ``nn.Parameter`` (classic LoRA)."""

from __future__ import annotations

from dataclasses import dataclass

from ..primitives import Generator, ParameterSlots


@dataclass
class Direct(Generator):
    """Slots are parameters initialized to the initializer's values; ``A``, ``B``
    train, the diagonal core ``d`` stays fixed."""

    name = "direct"

    def build(self, slots, rng):
        return ParameterSlots(slots)
