"""VeRA: frozen random factors shared across layers, trainable scaling vectors.

Kopiczko, Blankevoort, Asano, *VeRA: Vector-based Random Matrix Adaptation*
(ICLR 2024), §3 "Method", Eq. (2):

    h = W̄ x + Λ_b B Λ_d A x,      Λ_b = diag(b) (out),  Λ_d = diag(d) (r)

``A`` (r × in) and ``B`` (out × r) are random, frozen and shared by all layers; only
``b`` and ``d`` train, so a layer costs ``out + r`` parameters. Paper init (§3):
``A, B`` Kaiming-uniform, ``b = 0`` (so ``ΔW = 0`` at step 0), ``d = d_initial``
(0.1 in PEFT's ``VeraConfig``).

In lorakit's slot model this is two primitives:

- :class:`SharedRandom` (initializer): ``A0``, ``B0`` drawn from a generator seeded by
  ``(seed, shape)`` only — not by the layer name, as other initializers are — so
  layers of equal shape get identical matrices; ``d0 = d_initial``.
- :class:`VeRA` (generator): ``A``, ``B`` frozen buffers, ``d`` trainable, and one
  extra trainable vector ``lambda_b`` folded into the ``B`` slot it returns:
  ``B = diag(lambda_b)·B0``. The normalizer then sees ordinary ``(B, d, A)``, so with
  ``Scale`` (s = alpha/r) ``ΔW = s·diag(b)·B0·diag(d)·A0`` — Eq. (2) times ``s``.

Either composes with the rest: ``VeRA`` over PiSSA/LDU/OLoRA factors trains scaling
vectors on a principal basis; ``SharedRandom`` under ``Direct`` is LoRA with a
shared random start (residualized by core). Deviation from the generator rule of
docs/design.md (output equals the initializer's values at step 0): with the paper's
``b_initial = 0`` the returned ``B`` is 0 at step 0 — VeRA's own zero start, as
LoRA's ``B0 = 0``. ``b_initial=1.0`` follows the rule; core then residualizes.
Note ``VeRA`` over an initializer with ``B0 = 0`` (``kaiming``'s default) has a zero
basis and can never move: combine it with a non-zero ``B0``.

The frozen buffers are stored once per layer (as all lorakit slots); the paper's
memory saving on *storage* is the trainable-parameter count, which this matches.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core import Generator, Initializer, ParameterSlots, Role, Slot, SlotsModule
from lorakit.core.lora import kaiming_uniform


def _kaiming_uniform(shape: tuple[int, int], key: str, dtype: torch.dtype) -> torch.Tensor:
    """Kaiming-uniform (``a = √5``, as ``nn.Linear``) from a generator keyed by ``key``."""
    return kaiming_uniform(shape, math.sqrt(5), torch.Generator().manual_seed(zlib.crc32(key.encode())), dtype)


@dataclass
class SharedRandom(Initializer):
    """VeRA's frozen random matrices: identical for every layer of equal shape."""

    seed: int = 0
    d_initial: float = 0.1

    name = "shared-random"

    def factors(self, weight, rank, scale, rng):
        out_f, in_f = weight.shape
        # keyed by the shape of each factor, so A is shared by every layer with the
        # same (r, in) and B by every layer with the same (out, r)
        A0 = _kaiming_uniform((rank, in_f), f"vera-A:{self.seed}:{rank}x{in_f}", weight.dtype)
        B0 = _kaiming_uniform((out_f, rank), f"vera-B:{self.seed}:{out_f}x{rank}", weight.dtype)
        return B0, weight.new_full((rank,), self.d_initial), A0


class VeRASlots(SlotsModule):
    """``A``, ``B0`` frozen; ``d`` and ``lambda_b`` trainable; returns ``B = b ⊙ B0``."""

    def __init__(self, slots, b_initial: float):
        super().__init__(slots)  # B is declared trainable: it changes, through lambda_b
        B0 = slots["B"].value
        self.inner = ParameterSlots({**slots, "B": Slot(B0, False, Role.B)})  # B0 itself stays frozen
        self.lambda_b = nn.Parameter(B0.new_full((B0.shape[0],), b_initial))

    def forward(self):
        s = self.inner()
        s["B"] = self.lambda_b[:, None] * s["B"]
        return s


@dataclass
class VeRA(Generator):
    """Frozen ``A``, ``B``; trainable ``d`` (r) and output-side ``lambda_b`` (out)."""

    b_initial: float = 0.0

    name = "vera"
    #: B trains through lambda_b (B = diag(lambda_b)·B0); A and B0 stay frozen
    trainable_factors = {"A": False, "B": True, "d": True}

    def build(self, slots, rng):
        return VeRASlots(slots, self.b_initial)
