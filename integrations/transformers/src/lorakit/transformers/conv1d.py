"""transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) as a layer kind.

``Conv1D`` is a linear layer whose weight is stored transposed, in × out:
``y = x @ weight + bias``. lorakit sees it as ``W̄ = weightᵀ`` (out × in), like every
other layer, so factors, merge and export need no special case: ``A`` is r × in,
``B`` out × r, and the low-rank path is ``B (A x)`` exactly as for ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.core.layer_kinds import LayerKind


class Conv1DKind(LayerKind):
    all_linear = True  # a linear layer for targets="all-linear", as in PEFT
    fan_in_fan_out = True  # PEFT reads its factors with fan_in_fan_out (weight stored in × out)

    def matrix(self, base: nn.Module) -> Tensor:
        return base.weight.T  # a view: no copy of the in × out storage

    def set_matrix(self, base: nn.Module, W: Tensor) -> None:
        base.weight.data.copy_(W.T)

    def linear(self, base: nn.Module, x: Tensor) -> Tensor:
        return x @ base.weight

    def lowrank(self, base: nn.Module, x: Tensor, B: Tensor, A: Tensor) -> Tensor:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, A), B)
