"""``LDU``: LoLDU's Lower-Diag-Upper initialization (Shi et al., 2024;
arXiv:2410.13618, §III-A/B, Eq. 1 and 3–5; the equations were lost in extraction,
so here they are).

    W̄ = P L D U      (LU with partial pivoting, then D = diag(U), U ← D⁻¹ U)

``P`` a permutation, ``L`` unit lower-triangular (out × k), ``U`` unit
upper-triangular (k × in), ``k = min(out, in)``; rectangular ``W̄`` works. The top-r
components are

    B0 = P L[:, :r]   (P applied as a row index, never as a dense out × out matrix)
    A0 = U[:r]
    d0 = D[:r] / s    (``init="lu"``, "Regular LDU")

so ``s·B0 diag(d0) A0`` is the rank-r LDU part (the paper's DSM, Eq. 6, with
``σ0 = s``). Other ``init`` options replace ``D_r`` by a statistic of it (the initialization
ablation, Table V); with ``μ, σ_D`` the mean and (population) standard deviation of ``D_r``:

- ``constant``: every entry ``μ``;
- ``uniform``:  ``U(−|μ|/2, +|μ|/2)`` (the extracted paper lost the bounds; this is
  lorakit's reading, docs/design.md "Where lorakit reads a paper");
- ``normal``:   ``N(μ, σ_D²)``;

each also divided by ``s``; ``ones`` and ``zeros`` are literal. Random draws use the
layer's generator.

Reference-code variants (github.com/SKDDJ/LoLDU, ``minloldu/loldu.py``):

- ``unbiased_std=True``: ``normal`` draws with the Bessel-corrected ``σ_D``
  (``torch.std``'s default, which the reference code calls); the default keeps the
  population ``σ_D`` of the text. The two differ by ``sqrt(r/(r−1))`` (1.07 at r = 8);
  at ``r = 1`` the unbiased estimate is undefined and ``σ_D = 0`` is used.
- ``s_uniform``: ``U(−1, 1)`` and ``s_normal``: ``N(0, 1)``, the code's
  "standard" inits (the ablation's Table V rows without a statistic of ``D_r``;
  the extracted table lost which symbol is which). Literal, like ``ones``: not
  divided by ``s``, because they are not derived from ``D``. Whatever the option, core's residualization subtracts the
initial update, so the adapted layer equals the pretrained one at step 0 (the
reference code breaks the pretrained function for ``ones``/``zeros``).

Where partial pivoting meets a small pivot among the first r (|D_k| ≤ √ε·max|W̄|:
zero, or rounding — a zero leading column, such as an embedding's padding row at
index 0 (``W̄ = weightᵀ``), or leading columns dependent after pivoting), ``U ← D⁻¹U``
is undefined or rounding noise. LDU then takes the pivoted LDU of complete pivoting
(Gaussian elimination choosing the largest remaining entry, ``pivoted_ldu``)

    P W̄ Q = L D U,   B0 = P⁻¹ L[:, :r],   A0 = U[:r] Q⁻¹   (both as index maps)

which exists for every r ≤ rank(W̄), with |L|, |U| ≤ 1. Only a weight of numerical rank
k < r (the largest entry left after k steps is ≤ ε·max(out, in)·max|W̄|; a zero weight
has k = 0) has no rank-r LDU: that is an ``AdapterError`` naming k and the fix, never
inf/NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.core import AdapterError, Initializer

from .pivoted_ldu import complete_pivoting_ldu

INITS = ("lu", "constant", "uniform", "normal", "ones", "zeros", "s_uniform", "s_normal")


def permutation_from_pivots(pivots: torch.Tensor, rows: int) -> torch.Tensor:
    """Row index ``perm`` with ``W̄[perm] = L U`` from LAPACK's 1-based row swaps."""
    perm = list(range(rows))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    return torch.tensor(perm, device=pivots.device)


@dataclass
class LDU(Initializer):
    init: str = "lu"
    unbiased_std: bool = False  # normal: the reference code's Bessel-corrected σ_D

    name = "ldu"

    def __post_init__(self):
        if self.init not in INITS:
            raise AdapterError(f"LDU(init={self.init!r}): use one of {INITS}")
        if not isinstance(self.unbiased_std, bool):
            raise AdapterError(f"LDU(unbiased_std={self.unbiased_std!r}): must be true or false")

    def decompose(self, weight: torch.Tensor, rank: int):
        """``(P L[:, :r], D[:r], U[:r])`` with unit-triangular L and U: LU with partial
        pivoting (the paper's), or the completely pivoted ``P W̄ Q = L D U`` where that
        meets a zero pivot among the first r."""
        out_f, in_f = weight.shape
        LU, pivots, _ = torch.linalg.lu_factor_ex(weight)  # zero pivots are checked below
        D = LU.diagonal()[:rank]
        eps, top = torch.finfo(weight.dtype).eps, float(weight.abs().max())
        # partial pivoting's pivots cannot tell rounding from rank (a rank-k product's
        # (k+1)-th pivot reaches 1e3·ε·max|W̄|): below √ε·max|W̄|, complete pivoting decides
        if not bool((D.abs() > eps ** 0.5 * top).all()):  # NaN-safe
            return self.decompose_pivoted(weight, rank, eps * max(out_f, in_f) * top)
        eye = torch.eye(out_f, rank, dtype=weight.dtype, device=weight.device)
        L = torch.tril(LU[:, :rank], diagonal=-1) + eye
        U = torch.triu(LU[:rank]) / D[:, None]
        inverse = torch.argsort(permutation_from_pivots(pivots, out_f))
        return L[inverse], D, U  # (P L)[i] = L[perm⁻¹[i]]

    def decompose_pivoted(self, weight: torch.Tensor, rank: int, tol: float):
        """``(P⁻¹ L, D, U Q⁻¹)`` of complete pivoting, or the error saying why none exists."""
        out_f, in_f = weight.shape
        L, D, U, rows, cols = complete_pivoting_ldu(weight, rank, tol)
        if len(D) < rank:
            k = len(D)
            fix = (f"use rank <= {k} for this layer (rank_pattern) or another initializer such as PiSSA" if k
                   else "leave this layer out of the targets or use the kaiming initializer (LoRA's)")
            raise AdapterError(
                f"LDU: the {out_f}x{in_f} weight has numerical rank {k} < rank {rank} (the largest entry left after "
                f"{k} of {rank} completely pivoted elimination steps, P W Q = L D U, is <= {tol:.3g}): it has no "
                f"rank-{rank} LDU; {fix}")
        return L[torch.argsort(rows)], D, U[:, torch.argsort(cols)]

    def diagonal(self, D: torch.Tensor, scale: float, rng: torch.Generator) -> torch.Tensor:
        if self.init == "ones":
            return torch.ones_like(D)
        if self.init == "zeros":
            return torch.zeros_like(D)
        if self.init in ("s_uniform", "s_normal"):  # the code's standard draws, literal like ones
            draw = torch.rand if self.init == "s_uniform" else torch.randn
            u = draw(D.shape, generator=rng, dtype=torch.float64).to(D)
            return 2 * u - 1 if self.init == "s_uniform" else u
        if scale == 0:
            raise AdapterError(
                f"LDU(init={self.init!r}) divides the diagonal by the normalizer's initial scale, "
                "which is 0; set a non-zero alpha"
            )
        mean = D.mean()
        if self.init == "lu":
            d = D
        elif self.init == "constant":
            d = torch.full_like(D, float(mean))
        elif self.init == "uniform":
            u = torch.rand(D.shape, generator=rng, dtype=torch.float64).to(D)
            d = (u - 0.5) * mean.abs()  # half-width |μ|/2
        else:  # normal
            z = torch.randn(D.shape, generator=rng, dtype=torch.float64).to(D)
            unbiased = self.unbiased_std and D.numel() > 1
            d = mean + z * D.std(correction=1 if unbiased else 0)
        return d / scale

    def factors(self, weight, rank, scale, rng):
        B0, D, A0 = self.decompose(weight, rank)
        return B0.contiguous(), self.diagonal(D, scale, rng), A0.contiguous()
