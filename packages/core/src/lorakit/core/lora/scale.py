"""``Scale``: the LoRA scaling ``ΔW = s · B diag(d) A``.

- LoRA (Hu et al., 2021): ``s = alpha / r`` (alpha defaults to r, so s = 1);
- rsLoRA (Kalajdzievski, 2023): ``s = alpha / √r``;
- ``learnable=True``: ``s`` is a trainable scalar slot ``sigma`` initialized to the
  above (LoLDU's scaling factor σ, LoLDU, arXiv:2410.13618, §III).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..primitives import Normalizer, Role, Slot
from ..validation import check_bool, check_number


@dataclass
class Scale(Normalizer):
    alpha: float | None = None
    rs: bool = False
    learnable: bool = False

    name = "scale"

    def __post_init__(self):
        if self.alpha is not None:  # a NaN/inf alpha would silently poison every update
            check_number(self.alpha, "Scale.alpha")
        check_bool(self.rs, "Scale.rs")
        check_bool(self.learnable, "Scale.learnable")

    def initial_scale(self, rank: int) -> float:
        alpha = rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(rank) if self.rs else rank)

    def slots(self, weight, rank):
        if not self.learnable:
            return {}
        value = torch.tensor(self.initial_scale(rank), dtype=weight.dtype)
        return {"sigma": Slot(value, trainable=True, role=Role.SCALAR)}

    def factors(self, s, rank):
        scale = s["sigma"] if self.learnable else self.initial_scale(rank)
        return s["B"] * (scale * s["d"]), s["A"]
