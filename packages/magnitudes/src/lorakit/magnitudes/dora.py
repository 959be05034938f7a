"""``DoRA``: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353,
§4.1 Eq. 5, §4.3).

    W_eff = diag(m / sg(n)) · V,   V = W̄ + B'A',   n_i = ‖V_i‖   (per output row)

``m ∈ R^out`` is the trainable slot ``m``, initialized to ``‖W̄_i‖`` so that
``W_eff = W̄`` at step 0; ``sg`` is the stop-gradient of §4.3 (the norm is treated
as a constant in backward, as PEFT does), so ``n`` is computed under ``no_grad``.

The norm never forms the out × in matrix ``V`` (docs/design.md, "Residualization"):

    n_i² = ‖W̄_i‖² + 2 (W̄ A'ᵀ)_i · B'_i + B'_i (A'A'ᵀ) B'_iᵀ

(``lorakit.core.functional.row_sq_norms_of_sum``; ``‖W̄_i‖²`` is cached by the layer),
and ``m`` is initialized as ``sqrt`` of that same cached value, so with ``B' = 0``
the quotient is exactly 1 in every dtype. Core applies ``g = m/n`` to the output:
``y = g ⊙ (W̄x + B'(A'x)) + b``.

A row with ``n_i = 0`` (``V_i = 0``, the output channel is identically zero) gets
``g_i = m_i`` instead of a division by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.core import DORA_MAGNITUDE, Magnitude, Role, Slot
from lorakit.core.functional import row_sq_norms_of_sum


@dataclass
class DoRA(Magnitude):
    name = "dora"

    def slots(self, weight, row_sq_norm):
        # exported_as: m has exactly PEFT's lora_magnitude_vector meaning
        return {"m": Slot(row_sq_norm.sqrt(), trainable=True, role=Role.MAGNITUDE, exported_as=DORA_MAGNITUDE)}

    def row_scale(self, s, weight, row_sq_norm, B, A):
        with torch.no_grad():  # sg(n): DoRA §4.3
            n = row_sq_norms_of_sum(weight, row_sq_norm, B, A).sqrt()
            n = torch.where(n > 0, n, torch.ones_like(n))
        return s["m"] / n
