"""Pure math shared by layers, merge and export. No modules, no state.

Convention: ``W`` is out × in, ``B`` is out × R, ``A`` is R × in, ``ΔW = B A``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class WeightOperator(Protocol):
    """``W`` known only through ``times_t(M) = W Mᵀ`` (a quantized base: no out × in tensor)."""

    def times_t(self, M: Tensor) -> Tensor: ...


def dense_times_t(W: Tensor, M: Tensor) -> Tensor:
    """``W Mᵀ`` in ``M``'s dtype, computed in ``W``'s dtype: casting ``W`` (bf16 base,
    fp32 adapter) would copy the out × in matrix; rounding ``M`` to ``W``'s precision
    is at the resolution the layer computes its output in."""
    return (W @ M.T.to(W.dtype)).to(M.dtype)


def row_sq_norms_of_sum(W: Tensor | WeightOperator, W_row_sq: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """``‖(W + B A)_i‖²`` for every row i without forming the out × in sum.

    ``‖W_i + B_i A‖² = ‖W_i‖² + 2 (W Aᵀ)_i · B_i + B_i (A Aᵀ) B_iᵀ`` (DoRA; docs/design.md, "Residualization").
    Cost O(out·in·R) and memory O((out + in)·R). Clamped at 0 against cancellation.
    ``W`` is a dense tensor (:func:`dense_times_t`) or an operator whose ``times_t``
    applies it (a quantized layer's own kernel on A's rows).
    """
    WA = dense_times_t(W, A) if isinstance(W, Tensor) else W.times_t(A)  # out × R
    cross = (WA * B).sum(dim=1)
    quad = ((B @ (A @ A.T)) * B).sum(dim=1)
    return (W_row_sq + 2 * cross + quad).clamp_min(0)


def linear_lowrank(x: Tensor, W: Tensor, bias: Tensor | None, B: Tensor, A: Tensor,
                   g: Tensor | None = None, x_low: Tensor | None = None) -> Tensor:
    """``g ⊙ (W x + B (A x_low)) + b`` for a linear layer (``g = 1`` when None;
    ``x_low``, the adapter branch's input after dropout, is ``x`` when None).

    ``B (A x)`` is accumulated into the output of the base GEMM (``addmm_``) instead
    of being formed and added separately: one out × tokens tensor and one pass over
    it fewer, in forward and in backward.
    """
    x2 = x.reshape(-1, x.shape[-1])
    h = (x2 if x_low is None else x_low.reshape(-1, x.shape[-1])) @ A.T  # tokens × R
    if g is None:
        y = torch.nn.functional.linear(x2, W, bias).addmm_(h, B.T)
    else:
        y = torch.nn.functional.linear(x2, W).addmm_(h, B.T)
        y = y * g if bias is None else torch.addcmul(bias, y, g)
    return y.view(*x.shape[:-1], y.shape[-1])


def residual_factors(B: Tensor, A: Tensor, B0: Tensor, A0: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of ``B A − B0 A0`` that stay accurate however training splits the scale.

        B A − B0 A0 = [B t − B0, B0] · [A / t; A / t − A0]      for any t_i > 0

    The plain ``[B, −B0]·[A; A0]`` form cancels two large products; the difference
    form above does not, as long as each component of ``(B t, A / t)`` keeps the
    balance of ``(B0, A0)``. Scale-invariant normalizers (DeLoRA) and generators let
    ``‖a_i‖`` drift by 1e2–1e8 while ``‖b_i‖`` shrinks; without ``t`` then
    ``B − B0 ≈ −B0`` and fp32 loses up to 1e-2 of the output. So

        t_i = sqrt( (‖a_i‖ / ‖b_i‖) · (‖b0_i‖ / ‖a0_i‖) )

    (1 where a norm is zero: that component has nothing to cancel). ``t`` is held
    constant in autograd: the product does not depend on it, so gradients are exact.
    """
    nb, na = B.detach().norm(dim=0), A.detach().norm(dim=1)
    nb0, na0 = B0.norm(dim=0), A0.norm(dim=1)
    ok = (nb > 0) & (na > 0) & (nb0 > 0) & (na0 > 0)
    one = torch.ones_like(nb)
    t = torch.where(ok, ((na / torch.where(ok, nb, one)) * (nb0 / torch.where(ok, na0, one))).sqrt(), one)
    Bt, At = B * t, A / t[:, None]
    return torch.cat([Bt - B0, B0], dim=1), torch.cat([At, At - A0], dim=0)


def lowrank_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B A`` from the factors: ``B A = U diag(S) Vh``.

    QR of each factor, then an SVD of the small R × R core: O((out + in)·R²).
    """
    Qb, Rb = torch.linalg.qr(B)  # out × R, R × R
    Qa, Ra = torch.linalg.qr(A.T)  # in × R, R × R
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ U, S, Vh @ Qa.T


def energy_rank(S: Tensor, energy: float) -> int:
    """The smallest ``k`` whose singular values hold ``energy`` of the total:
    ``Σ_{i<k} S_i² / Σ S_i² ≥ energy`` (``S`` descending; at least 1)."""
    sq = S.double().square()
    total = sq.sum()
    if S.numel() == 0 or total <= 0:
        return 1
    # a hair of slack so energy=1.0 is met by the full sum despite rounding in cumsum
    reached = (sq.cumsum(0) >= energy * total * (1 - 1e-12)).nonzero()
    return int(reached[0]) + 1 if len(reached) else S.numel()


def kept_rank(S: Tensor, size: int, max_rank: int | str | None = None, energy: float = 0.999) -> int:
    """How many of the descending singular values ``S`` of an out × in update an export keeps.

    Always drops what is zero to the fp64 SVD's own accuracy (below
    ``4·eps64·size·S_max``, ~1e-12 relative: noise of the QR and SVD, not part of
    the update; ``size = max(out, in)``). ``max_rank=k`` caps at ``k``;
    ``"auto"`` keeps the smallest rank holding ``energy`` of ``Σ S²``.
    """
    if S.numel() == 0:
        return 1
    floor = 4 * torch.finfo(torch.float64).eps * max(size, 1) * S.max()
    keep = max(int((S > floor).sum()), 1)
    if max_rank == "auto":
        keep = min(keep, energy_rank(S, energy))
    elif max_rank is not None:
        keep = min(keep, max_rank)
    return keep


def split_svd(U: Tensor, S: Tensor, Vh: Tensor, keep: int, total_sq: Tensor | None = None
              ) -> tuple[Tensor, Tensor, float]:
    """``(B_k, A_k, rel_err)`` from the first ``keep`` singular triplets, the
    singular values split evenly (``B_k = U√S``, ``A_k = √S Vh``).
    ``rel_err = ‖M − B_kA_k‖_F / ‖M‖_F`` with ``‖M‖²_F = total_sq`` (default ``Σ S²``,
    which is ``‖M‖²`` when ``S`` holds every singular value)."""
    total = S.square().sum() if total_sq is None else total_sq
    dropped = (total - S[:keep].square().sum()).clamp_min(0)
    rel_err = float((dropped / total).sqrt()) if total > 0 else 0.0
    root = S[:keep].sqrt()
    return U[:, :keep] * root, root[:, None] * Vh[:keep], rel_err


def reduce_lowrank(B: Tensor, A: Tensor, rank: int | None = None, *, max_rank: int | str | None = None,
                   energy: float = 0.999) -> tuple[Tensor, Tensor, float]:
    """Rewrite ``B A`` with as few rank-1 terms as possible; return ``(B_k, A_k, rel_err)``.

    ``rank=None`` (and no ``max_rank``) is exact: it keeps every direction the
    factors hold (see :func:`kept_rank`). ``max_rank=k`` keeps at most ``k``;
    ``max_rank="auto"`` the fewest holding ``energy`` of the update's energy. An
    explicit ``rank`` truncates to exactly ``rank``, zero-padded. ``rel_err =
    ‖BA − B_kA_k‖_F / ‖BA‖_F`` reports what was lost.
    """
    work = torch.float64  # O((out + in)·R²): cheap enough to always do in fp64
    U, S, Vh = lowrank_svd(B.to(work), A.to(work))
    size = max(B.shape[0], A.shape[1])
    keep = min(rank, S.numel()) if rank is not None else kept_rank(S, size, max_rank, energy)
    B_k, A_k, rel_err = split_svd(U, S, Vh, keep)
    if rank is not None and keep < rank:  # pad with zero terms so the requested rank is honoured
        pad = rank - keep
        B_k = torch.cat([B_k, B_k.new_zeros(B_k.shape[0], pad)], 1)
        A_k = torch.cat([A_k, A_k.new_zeros(pad, A_k.shape[1])], 0)
    return B_k.to(B.dtype), A_k.to(A.dtype), rel_err


def reduce_dense(D: Tensor, max_rank: int | str | None = None, energy: float = 0.999,
                 oversample: int = 8, niter: int = 4) -> tuple[Tensor, Tensor, float]:
    """``(B_k, A_k, rel_err)`` for a dense out × in update ``D`` (fp64 expected).

    Exact SVD unless an integer ``max_rank`` is well below ``min(out, in)``: then a
    randomized range ``Q`` (``torch.svd_lowrank``, ``max_rank + oversample``
    columns) and the exact SVD of the small ``Qᵀ D``, so only out × q extra memory.
    ``rel_err`` is exact either way: ``‖D − D_k‖² = ‖D‖² − Σ_{i<k} s_i²`` holds for
    the singular values of any orthogonal projection ``Q Qᵀ D``.
    """
    small = min(D.shape)
    total_sq = D.square().sum()
    if isinstance(max_rank, int) and max_rank + oversample < small:
        Q, _, _ = torch.svd_lowrank(D, q=max_rank + oversample, niter=niter)
        u, S, Vh = torch.linalg.svd(Q.T @ D, full_matrices=False)
        U = Q @ u
    else:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    keep = kept_rank(S, max(D.shape), max_rank, energy)
    return split_svd(U, S, Vh, keep, total_sq)
