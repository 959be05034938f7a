"""Gaussian elimination with complete pivoting: the pivoted LDU ``P W Q = L D U``
that LDU falls back to where LU with partial pivoting meets a zero pivot.

After ``k`` steps on ``W`` (out × in), with row order ``rows`` (``P``) and column
order ``cols`` (``Q``),

    W[rows][:, cols] = L D U + [[0, 0], [0, S]]

``L`` (out × k) unit lower-trapezoidal, ``U`` (k × in) unit upper-trapezoidal, both
with entries of magnitude ≤ 1 (each pivot is the largest entry left), ``D`` the k
pivots and ``S`` the Schur complement left. Step ``k`` stops when the largest entry of
``S`` is ≤ ``tol``: ``W`` then has numerical rank ``k`` and its rank-r LDU part does
not exist for r > k. A zero column or row (an embedding's padding row) is never a
pivot, so it is no obstacle at any rank ≤ rank(W).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _swap(S: Tensor, order: Tensor, dim: int, a: int, b: int) -> None:
    if a == b:
        return
    if dim == 0:
        S[[a, b]] = S[[b, a]]
    else:
        S[:, [a, b]] = S[:, [b, a]]
    order[[a, b]] = order[[b, a]]


def complete_pivoting_ldu(W: Tensor, rank: int, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(L, D, U, rows, cols)`` after up to ``rank`` elimination steps (fewer, ``len(D)``,
    when the largest entry left is ≤ ``tol``). ``O(rank · out · in)`` work, one copy of ``W``."""
    S = W.clone()
    m, n = S.shape
    rows = torch.arange(m, device=W.device)
    cols = torch.arange(n, device=W.device)
    k = 0
    while k < rank:
        flat = int(S[k:, k:].abs().argmax())
        i, j = k + flat // (n - k), k + flat % (n - k)
        if not bool(S[i, j].abs() > tol):  # NaN-safe: the rest is numerically zero
            break
        _swap(S, rows, 0, k, i)
        _swap(S, cols, 1, k, j)
        S[k + 1:, k] /= S[k, k]  # L's column k below its unit diagonal
        S[k + 1:, k + 1:] -= torch.outer(S[k + 1:, k], S[k, k + 1:])
        k += 1
    D = S.diagonal()[:k].clone()
    L = torch.tril(S[:, :k], diagonal=-1) + torch.eye(m, k, dtype=W.dtype, device=W.device)
    U = torch.triu(S[:k]) / D[:, None]  # p / p is exactly 1: a unit diagonal
    return L, D, U, rows, cols
