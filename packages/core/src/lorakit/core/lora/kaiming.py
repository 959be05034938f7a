"""``Kaiming``: LoRA's initialization (Hu et al., 2021, §4.1; PEFT's default).

``A0`` Kaiming-uniform with ``a = √5`` (bound ``1/√in``, as ``nn.Linear``),
``B0 = 0`` so ``ΔW(θ0) = 0``; ``zero_b=False`` draws ``B0`` the same way over its
own fan-in ``r`` (DeLoRA's recipe, whose non-zero start is then residualized).
``d0 = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..primitives import Initializer
from ..validation import check_bool, check_number


def kaiming_uniform(shape: tuple[int, int], a: float, rng: torch.Generator, dtype) -> torch.Tensor:
    """``torch.nn.init.kaiming_uniform_`` drawn from an explicit generator."""
    fan_in = shape[1]
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in)
    return (torch.rand(shape, generator=rng, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


@dataclass
class Kaiming(Initializer):
    a: float = math.sqrt(5)
    zero_b: bool = True

    name = "kaiming"

    def __post_init__(self):
        check_number(self.a, "Kaiming.a")  # a NaN/inf gain gives a NaN A0
        check_bool(self.zero_b, "Kaiming.zero_b")

    def factors(self, weight, rank, scale, rng):
        out_f, in_f = weight.shape
        A0 = kaiming_uniform((rank, in_f), self.a, rng, weight.dtype)
        if self.zero_b:
            B0 = weight.new_zeros(out_f, rank)
        else:
            B0 = kaiming_uniform((out_f, rank), self.a, rng, weight.dtype)
        return B0, weight.new_ones(rank), A0
