"""``PiSSA``: principal singular values and vectors adaptation (Meng et al., 2024, §3).

    W̄ = U S Vᵀ,   B0 = U_r √(S_r/s),   A0 = √(S_r/s) V_rᵀ,   d0 = 1

so that ``s · B0 A0 = U_r S_r V_rᵀ`` is the rank-r principal part of ``W̄`` for the
normalizer's initial scale ``s`` (PEFT divides ``S_r`` by its ``scaling`` the same
way). Core's residualization turns ``W̄ − s·B0A0`` into PiSSA's residual weight, so
the adapted layer equals the pretrained one at step 0 whatever the normalizer.

- ``svd="full"``: ``torch.linalg.svd`` (exact);
- ``svd="lowrank"``: ``torch.svd_lowrank`` (Halko et al.'s randomized range finder,
  ``niter`` power iterations) with ``q = min(r + 10, min(out, in))`` — 10 columns
  of oversampling, truncated back to ``r``. Its random draw is seeded from the
  layer's generator, so the result is deterministic for a given ``Adapter(seed=…)``.

Rank-deficient ``W̄`` is fine: the missing singular values are zero and so are the
matching columns of ``B0`` and rows of ``A0`` (those directions train like LoRA's
with ``B0 = 0``). A negative ``s`` flips the sign of ``B0``; ``s = 0`` is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.core import AdapterError, Initializer

SVDS = ("full", "lowrank")
OVERSAMPLE = 10
#: power iterations of the randomized SVD; more gains nothing and a huge value hangs apply
MAX_NITER = 100


@dataclass
class PiSSA(Initializer):
    svd: str = "full"
    niter: int = 4

    name = "pissa"

    def __post_init__(self):
        if self.svd not in SVDS:
            raise AdapterError(f"PiSSA(svd={self.svd!r}): use one of {SVDS}")
        if isinstance(self.niter, bool) or not isinstance(self.niter, int) or not 0 <= self.niter <= MAX_NITER:
            raise AdapterError(f"PiSSA(niter={self.niter!r}): niter must be an integer in [0, {MAX_NITER}] "
                               "(svd_lowrank's default is 2; each iteration is two passes over the weight)")

    def principal(self, weight: torch.Tensor, rank: int, rng: torch.Generator):
        """``(U_r, S_r, V_r)`` with ``W̄ ≈ U_r diag(S_r) V_rᵀ``."""
        if self.svd == "full":
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            return U[:, :rank], S[:rank], Vh[:rank].T
        q = min(rank + OVERSAMPLE, min(weight.shape))
        seed = int(torch.randint(0, 2**62, (), generator=rng))
        devices = [weight.device] if weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # leave the global RNG untouched
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(weight, q=q, niter=self.niter)
        return U[:, :rank], S[:rank], V[:, :rank]

    def factors(self, weight, rank, scale, rng):
        if scale == 0 or not math.isfinite(scale):
            raise AdapterError(
                f"PiSSA needs a finite, non-zero initial scale from the normalizer (got {scale}); "
                "set the normalizer's alpha to a non-zero value"
            )
        U, S, V = self.principal(weight, rank, rng)
        root = (S / abs(scale)).sqrt()
        B0 = U * (root * math.copysign(1.0, scale))
        A0 = root[:, None] * V.T
        return B0.contiguous(), weight.new_ones(rank), A0.contiguous()
