"""``Diagonal``: LoLDU's parameterization (LoLDU, arXiv:2410.13618, §III).

``ΔW = s · B diag(d) A`` with the factors ``A, B`` frozen (kept as buffers from the
initializer; with ``LDU`` they are the pivoted lower/upper triangular parts of
``W̄``) and only the diagonal core ``d`` trainable, plus the normalizer's own slots
(LoLDU's learnable scale ``σ`` via ``Scale(learnable=True)``). The trainable count
is ``r`` per layer (+1 for ``σ``). With ``Kaiming(zero_b=False)`` frozen random
factors and a trained diagonal, this is VeRA-like.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.core import Generator, ParameterSlots


@dataclass
class Diagonal(Generator):
    """Only ``d`` (and normalizer slots) train; ``A`` and ``B`` are frozen buffers."""

    name = "diagonal"
    trainable_factors = {"A": False, "B": False, "d": True}

    def build(self, slots, rng):
        return ParameterSlots(slots)
