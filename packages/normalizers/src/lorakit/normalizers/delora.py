"""``DeLoRA``: decoupled low-rank adaptation (Bini et al., *Decoupling Angles and
Strength in Low-rank Adaptation*, ICLR 2025, arXiv:2503.18225, §2, Eq. 5–9 and 15).

    ΔW = (λ/r) · B diag(d ⊙ ξ) A diag(w),   ξ_i = 1 / (max(‖b_i‖, eps) · max(‖a_i‖, eps))

``b_i`` is column i of ``B``, ``a_i`` row i of ``A``; ``d`` is the diagonal core
(fixed ones under ``Direct``). Each rank-1 term is normalized (Eq. 5), the sum
scaled by ``λ/r`` (Eq. 7) and by the pretrained weight norm (Eq. 8):

- ``weight_norm="column"``: ``w_j = ‖W̄[:, j]‖`` per input column (as PEFT's
  ``delora`` and the official code);
- ``weight_norm="frobenius"``: ``w = ‖W̄‖_F``, the scalar of Eq. 8 as written.

``w`` is computed once from ``W̄`` and stored as the frozen slot ``w_norm``; ``λ`` is
the trainable scalar slot ``lambda_``, one per layer, initialized to ``lambda0``
(default 15, PEFT's ``delora_lambda`` default; the paper tunes it per task).

**Bound** (property-tested): ``‖ΔW‖_F ≤ |λ| · max_j w_j · max_i |d_i|``. Proof:
``‖ΔW‖_F ≤ (|λ|/r) Σ_i |d_i| ξ_i ‖b_i‖ ‖diag(w) a_i‖ ≤ (|λ|/r) Σ_i |d_i| max_j w_j
≤ |λ| max_j w_j max_i |d_i|``, because ``‖diag(w) a_i‖ ≤ max_j w_j ‖a_i‖`` and
``ξ_i ‖b_i‖ ‖a_i‖ ≤ 1`` (``max(x, eps) ≥ x``). With the Frobenius norm ``w`` is one
number and the same chain holds.

Eq. 9 (subtracting a frozen copy of the initial update) is core's residualization:
the recipe ``delora`` draws both factors Kaiming-uniform (``Kaiming(zero_b=False)``)
and core keeps a *clone* of the initial factors (the official code aliased the
frozen copy with the live parameter) and unmerges exactly. PEFT's variant
(``B0 = 0``, no residual) is ``init=Kaiming()``.

**The official code's residual** (``residual_lambda="live"``). Eq. 9 subtracts the
initial update *frozen*, ``ΔW = λN − λ0N0`` (``N`` the normalized product above
without ``λ``, ``N0`` its value at init): core's residualization, the default
``"initial"``. The authors' code scales the frozen copy by the *live* λ,
``ΔW = λ(N − N0)``: the update is zero whenever the directions are back at
their initial values, whatever λ is, and ``‖ΔW‖_F ≤ |λ|·max_j w_j·(max_i |d_i| +
max_i |d0_i|)``. Core subtracts ``B0'A0' = λ0N0`` and is not changed; the normalizer
returns 2r components instead of r,

    B' = [ (λ/r)·d_i·b_i/‖b_i‖ ,  −((λ − λ0)/r)·d0_i·b0_i/‖b0_i‖ ],   A' = [ A'_i ; A0'_i ]

so that ``B'A' − B0'A0' = λN − (λ − λ0)N0 − λ0N0 = λ(N − N0)``. The initial
directions ``d0_i·b0_i/‖b0_i‖`` and ``A0'_i`` are frozen slots (``n0_B``, ``n0_A``)
filled on the first call of ``factors`` — which core makes at construction, with the
initial values — and marked filled by the slot ``n0_set``; a checkpoint load
overwrites all three with the saved values. Their second-half columns are zero at
init (``λ = λ0``), so identity at init is exact. It costs one host read of
``n0_set`` per forward (``"initial"`` has none) and requires the generator to return
frozen slots as stored, as every built-in one does (``ParameterSlots``).

Only factors are returned, each with unit directions so that neither depends on
how training splits the scale between ``B`` and ``A`` (DeLoRA is invariant to it,
and ``‖a_i‖`` drifts by 1e2–1e8 under training):

    B'_i = (λ/r) d_i · b_i / ‖b_i‖,    A'_i = (a_i / ‖a_i‖) ⊙ w

so nothing out × in is formed and core's residual difference ``B' − B0'`` stays
small. Norms are ``sqrt(max(‖·‖², eps²))``: equal to ``max(‖·‖, eps)`` and finite
in value and gradient for zero rows/columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.core import AdapterError, Normalizer, Role, Slot

WEIGHT_NORMS = ("column", "frobenius")
#: what scales the subtracted initial update: λ0 (Eq. 9, default) or the live λ (official code)
RESIDUAL_LAMBDAS = ("initial", "live")


@dataclass
class DeLoRA(Normalizer):
    lambda0: float = 15.0
    weight_norm: str = "column"
    eps: float = 1e-4
    residual_lambda: str = "initial"  # "live": the official code's λ(N − N0)

    name = "delora"

    def __post_init__(self):
        if isinstance(self.lambda0, bool) or not isinstance(self.lambda0, (int, float)) \
                or not math.isfinite(self.lambda0):
            raise AdapterError(f"DeLoRA(lambda0={self.lambda0!r}): lambda0 must be a finite number")
        if self.weight_norm not in WEIGHT_NORMS:
            raise AdapterError(f"DeLoRA(weight_norm={self.weight_norm!r}): use one of {WEIGHT_NORMS}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < math.inf:
            raise AdapterError(f"DeLoRA(eps={self.eps!r}): eps must be a finite number > 0")
        if self.residual_lambda not in RESIDUAL_LAMBDAS:
            raise AdapterError(f"DeLoRA(residual_lambda={self.residual_lambda!r}): use one of {RESIDUAL_LAMBDAS}")

    def slots(self, weight, rank):
        sq = weight.square()
        w = sq.sum(dim=0).sqrt() if self.weight_norm == "column" else sq.sum().sqrt()
        return {
            "lambda_": Slot(torch.tensor(float(self.lambda0), dtype=weight.dtype), trainable=True, role=Role.SCALAR),
            "w_norm": Slot(w, trainable=False, role=Role.STATISTIC),
        }

    def slots_at_init(self, weight, rank, factors):
        slots = self.slots(weight, rank)
        if self.residual_lambda == "live":  # N0's directions, frozen from the initial factors
            B0_dir, A0_dir = self._directions(factors["B"], factors["d"], factors["A"], slots["w_norm"].value)
            slots["n0_B"] = Slot(B0_dir, trainable=False, role=Role.STATISTIC)
            slots["n0_A"] = Slot(A0_dir, trainable=False, role=Role.STATISTIC)
            # always 1; kept so that checkpoints written when it was a fill-once flag keep their keys
            slots["n0_set"] = Slot(weight.new_ones(()), trainable=False, role=Role.STATISTIC)
        return slots

    def _directions(self, B, d, A, w_norm):
        """``(d_i b_i/‖b_i‖, (a_i/‖a_i‖) ⊙ w)``: the unit-direction factors before λ/r."""
        eps2 = self.eps * self.eps
        b_norm = B.square().sum(dim=0).clamp_min(eps2).sqrt()  # ‖b_i‖, columns of B
        a_norm = A.square().sum(dim=1, keepdim=True).clamp_min(eps2).sqrt()  # ‖a_i‖, rows of A
        return B * (d / b_norm), (A / a_norm) * w_norm

    def factors(self, s, rank):
        B_dir, A_dir = self._directions(s["B"], s["d"], s["A"], s["w_norm"])
        lam = s["lambda_"]
        if self.residual_lambda == "initial":
            return B_dir * (lam / rank), A_dir
        B0_dir, A0_dir = s["n0_B"], s["n0_A"]
        return (torch.cat([B_dir * (lam / rank), B0_dir * ((self.lambda0 - lam) / rank)], dim=1),
                torch.cat([A_dir, A0_dir], dim=0))
