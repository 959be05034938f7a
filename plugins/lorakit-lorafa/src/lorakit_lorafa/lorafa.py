"""``LoRAFA``: LoRA with a frozen projection-down matrix (Zhang et al., 2023,
arXiv:2308.03303, §3 "LoRA-FA").

    ΔW = s · B diag(d) A,   A = A0 frozen (random, from the initializer),  B trained

Only ``B`` (out × r) trains; with Kaiming's ``B0 = 0`` the update starts at zero as
in the paper. The generator declares it in :attr:`trainable_factors`, core stores
``A`` as a buffer, and the conformance kit checks that ``A`` never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.core import Generator, ParameterSlots


@dataclass
class LoRAFA(Generator):
    name = "lora-fa"
    trainable_factors = {"A": False, "B": True, "d": False}

    def build(self, slots, rng):
        return ParameterSlots(slots)  # trainable slots → parameters, frozen (A) → buffers
