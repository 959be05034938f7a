"""Pure math shared by layers, merge and export. No modules, no state.

Convention: ``W`` is out × in, ``B`` is out × R, ``A`` is R × in, ``ΔW = B A``.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import Tensor


class WeightOperator(Protocol):
    """``W`` known only through ``times_t(M) = W Mᵀ`` (a quantized base: no out × in tensor)."""

    def times_t(self, M: Tensor) -> Tensor: ...


class BaseOperator(Protocol):
    """A frozen base ``W̄`` known by its two products with activations: what the one-node
    fused linear (:func:`linear_lowrank`) needs of a quantized base in place of a dense
    weight (``LayerKind.fused_weight``). Neither keeps anything for backward.

        linear(x, with_bias) = x W̄ᵀ (+ b)      the module's own kernel (tokens × out)
        linear_t(gy)         = gy W̄            ∂L/∂x of it (tokens × in, a new tensor)
    """

    def linear(self, x: Tensor, with_bias: bool) -> Tensor: ...

    def linear_t(self, gy: Tensor) -> Tensor: ...


def _base_linear(W: Tensor | BaseOperator, x2: Tensor, bias: Tensor | None) -> Tensor:
    """``x W̄ᵀ (+ b)``: a dense weight by ``F.linear``, an operator by its own kernel."""
    if isinstance(W, Tensor):
        return torch.nn.functional.linear(x2, W, bias)
    return W.linear(x2, bias is not None)


def _plus_lowrank(W: Tensor | BaseOperator, y: Tensor, h: Tensor, B: Tensor) -> Tensor:
    """``y + h Bᵀ``: in place into the dense GEMM's own output; out of place on an operator's,
    which its module may have handed to someone else too (a forward hook, its autograd)."""
    return y.addmm_(h, B.T) if isinstance(W, Tensor) else torch.addmm(y, h, B.T)


def _base_linear_t(W: Tensor | BaseOperator, gy: Tensor) -> Tensor:
    """``gy W̄`` (the base's input gradient)."""
    return gy @ W if isinstance(W, Tensor) else W.linear_t(gy)


def all_finite(t: Tensor) -> bool:
    """No NaN or ±inf in ``t``: its minimum and maximum are finite (both propagate NaN).
    One fused reduction; ``isfinite(t).all()`` builds a bool tensor of ``t``'s size
    first and was ~7× slower on an out × in weight (CPU)."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def autocast_on(device_type: str) -> bool:
    """``torch.autocast`` is active for ``device_type`` (False for a device autocast
    does not know, such as ``meta``)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a GEMM on ``x`` in, or None where it leaves ``x``
    as it is: autocast off on ``x``'s device, or ``x`` fp64 or not floating (not cast)."""
    if x.is_floating_point() and x.dtype != torch.float64 and autocast_on(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type`` where it is on (else nothing to do):
    the adapter's own math (generators, normalizers, DoRA's row norms, merge) stays in
    the adapter's dtype; only the GEMMs with activations take the autocast dtype."""
    return torch.autocast(device_type, enabled=False) if autocast_on(device_type) else contextlib.nullcontext()


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


#: What the fused DoRA linear can keep for the magnitude's gradient (docs/design.md,
#: "Work and memory per forward"), the ``saves`` argument of :func:`linear_lowrank`:
#: ``"output"`` (default) keeps the layer's output ``z`` (often kept by the next op
#: anyway, then free) and recovers ``y = (z − b) / g`` in backward; ``"pre-scale"`` keeps
#: ``y`` itself (tokens × out per layer; the earlier form, for models that edit a layer's
#: output in place); ``"recompute"`` keeps nothing tokens × out and recomputes ``y`` in
#: backward, one more base GEMM per layer (the least memory, at that cost: choose it per
#: layer, e.g. where nothing else keeps the output). Under ``torch.compile`` the traced
#: autograd form is used and AOTAutograd's partitioner chooses what to keep.
DORA_SAVES_OPTIONS = ("output", "pre-scale", "recompute")


class _LowRankLinear(torch.autograd.Function):
    """``z = g ⊙ y + b``, ``y = W x + B h``, ``h = A x_low`` (``g = 1`` when None), one
    autograd node with a hand-written backward. With ``go = ∂L/∂z``, ``gy = go ⊙ g``:

        ∂L/∂x     = gy W (+ (gy B) A when x_low is x, accumulated in place)
        ∂L/∂x_low = (gy B) A      ∂L/∂B = gyᵀ h      ∂L/∂A = (gy B)ᵀ x_low
        ∂L/∂b     = Σ_t go_t      ∂L/∂W = gyᵀ x (only if W is trained)
        ∂L/∂g_i   = Σ_t go_ti · y_ti,   y_ti = (z_ti − b_i) / g_i

    Against autograd's trace of the same ops: one node instead of five, the two input
    gradients accumulated into one tensor (no extra tokens × in sum), and every
    product with a rank-R side computed in the layout the BLAS handles fast: the
    tokens-long dimension as the *columns* of an R × tokens result, i.e.
    ``hᵀ = A x_lowᵀ``, ``(gy B)ᵀ = Bᵀ gyᵀ``, ``(∂L/∂B)ᵀ = hᵀ gy``. Autograd's own
    forms (``gy B``, ``gyᵀ h``: a tokens × R output, or a tokens-long inner dimension
    with an R-wide result) ran 3–8× slower on one CPU thread (MKL, 1,024 tokens,
    R = 8), which was most of LoRA's cost over the frozen model.
    DoRA keeps the output ``z`` instead of ``y``; ``z`` is usually kept by the next op
    as its input (SiLU, the gate product, attention's values), so this costs nothing
    there. Rows where ``z`` does not determine ``y`` (``g_i = 0``, or so small that
    ``g·y`` may underflow) get ``y_i = W_i x + B_i h`` recomputed for those rows only.
    ``h`` (tokens × R) is kept: small, and it spares a GEMM. ``recompute=True`` keeps
    no ``z`` and recomputes ``y = W x + B h`` in backward (one more base GEMM).
    """

    @staticmethod
    def forward(ctx, x2: Tensor, xl2: Tensor | None, W: Tensor | BaseOperator, bias: Tensor | None, B: Tensor,
                A: Tensor, g: Tensor | None, recompute: bool) -> Tensor:
        # a quantized base (an operator) is frozen and kept by its module, not by this node
        ctx.op = None if isinstance(W, Tensor) else W
        Wt = W if ctx.op is None else None
        h = (A @ (x2 if xl2 is None else xl2).T).T  # hᵀ = A xᵀ is R × tokens, contiguous
        if g is None:
            z = _plus_lowrank(W, _base_linear(W, x2, bias), h, B)
            ctx.save_for_backward(x2, xl2, Wt, bias, B, A, h)
            return z
        y = _plus_lowrank(W, _base_linear(W, x2, None), h, B)
        z = y.mul_(g) if bias is None else torch.addcmul(bias, y, g)  # y is not kept (freed here)
        ctx.save_for_backward(x2, xl2, Wt, bias, B, A, h, g, *(() if recompute else (z,)))
        return z

    @staticmethod
    def backward(ctx, go: Tensor):
        # forward ran with autocast off (linear_lowrank casts explicitly): so does backward,
        # wherever loss.backward() is called (what torch.amp.custom_bwd does, for any device)
        with autocast_off(go.device.type):
            return _LowRankLinear._backward(ctx, go)

    @staticmethod
    def _backward(ctx, go: Tensor):
        x2, xl2, W, bias, B, A, h, *gz = ctx.saved_tensors
        W = W if ctx.op is None else ctx.op
        need_x, need_xl, need_W, need_b, need_B, need_A, need_g, _ = ctx.needs_input_grad
        g, z = (*gz, None)[:2] if gz else (None, None)
        grad_g = None
        if g is not None and need_g and z is None:  # recompute: y = W x + B h, the one extra GEMM
            grad_g = (go * _plus_lowrank(W, _base_linear(W, x2, None), h, B)).sum(0)
        elif g is not None and need_g:  # first: its tokens × out temporary is freed before gy exists
            assert z is not None  # saved together with g
            unknown = g.abs() < torch.finfo(g.dtype).tiny ** 0.5
            safe = torch.where(unknown, torch.ones_like(g), g)
            # Σ_t go_ti (z_ti − b_i) / g_i, without forming y = (z − b) / g
            zgo = (go * z).sum(0)
            grad_g = (zgo if bias is None else zgo - bias * go.sum(0)) / safe
            rows = unknown.nonzero().flatten()
            if len(rows):
                # an operator has no rows: its whole product, for a case this rare
                Wx = torch.nn.functional.linear(x2, W[rows]) if ctx.op is None else ctx.op.linear(x2, False)[:, rows]
                y_rows = _plus_lowrank(W, Wx, h, B[rows])
                grad_g[rows] = (go[:, rows] * y_rows).sum(0)
        grad_b = go.sum(0) if need_b and bias is not None else None
        gy = go if g is None else go * g
        gyB_t = B.T @ gy.T if need_x or need_xl or need_A else None  # (gy B)ᵀ, R × tokens
        gyB = gyB_t.T.contiguous() if gyB_t is not None and (need_x or need_xl) else None  # tokens × R: small
        grad_x = _base_linear_t(W, gy) if need_x else None
        grad_xl = None
        if xl2 is None and need_x:
            assert grad_x is not None and gyB is not None
            grad_x.addmm_(gyB, A)
        elif need_xl:
            grad_xl = gyB @ A
        grad_W = gy.T @ x2 if need_W else None
        grad_B = (h.T @ gy).T if need_B else None
        grad_A = gyB_t @ (x2 if xl2 is None else xl2) if need_A else None
        return grad_x, grad_xl, grad_W, grad_b, grad_B, grad_A, grad_g, None


def linear_lowrank(x: Tensor, W: Tensor | BaseOperator, bias: Tensor | None, B: Tensor, A: Tensor,
                   g: Tensor | None = None, x_low: Tensor | None = None, saves: str = "output") -> Tensor:
    """``g ⊙ (W x + B (A x_low)) + b`` for a linear layer (``g = 1`` when None;
    ``x_low``, the adapter branch's input after dropout, is ``x`` when None). ``W`` is
    the dense weight or, for a quantized base, a :class:`BaseOperator` (the module's
    own kernel forward, its input gradient in backward; nothing of it is kept).

    ``B (A x)`` is accumulated into the output of the base GEMM (``addmm_``) instead
    of being formed and added separately: one out × tokens tensor and one pass over
    it fewer, in forward and in backward. In eager training the whole layer is one
    autograd node (:class:`_LowRankLinear`); with ``g`` (DoRA) it keeps the output
    rather than ``y`` (``saves``, one of :data:`DORA_SAVES_OPTIONS`).

    Under ``torch.autocast`` every operand is cast to the autocast dtype first and the
    layer runs with autocast off: what ``nn.Linear`` computes under autocast (GEMMs and
    output in that dtype), with the casts in autograd so that ``B``, ``A`` and ``g``
    get their gradients in their own (fp32) dtype. Left to autocast, ``F.linear`` would
    give bf16 while the in-place ``addmm_`` adding ``B h`` is not cast (a dtype error).
    """
    if saves not in DORA_SAVES_OPTIONS:
        raise ValueError(f"dora_saves={saves!r}: use one of {DORA_SAVES_OPTIONS} (AdaptedLayer.dora_saves)")
    low = autocast_dtype(x)
    if low is None:
        return _linear_lowrank(x, W, bias, B, A, g, x_low, saves)
    own = x_low is None or x_low is x

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(low)

    with torch.autocast(x.device.type, enabled=False):
        # an operator computes in its own dtype (AdaptedLayer sends none under autocast: the
        # quantized modules' output dtypes there are their own)
        Wl = W.to(low) if isinstance(W, Tensor) else W
        return _linear_lowrank(x.to(low), Wl, cast(bias), B.to(low), A.to(low), cast(g),
                               None if own else cast(x_low), saves)


def _linear_lowrank(x: Tensor, W: Tensor | BaseOperator, bias: Tensor | None, B: Tensor, A: Tensor,
                    g: Tensor | None, x_low: Tensor | None, saves: str) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    xl2 = None if x_low is None or x_low is x else x_low.reshape(-1, x.shape[-1])
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (g is None or (xl2 is None and saves != "pre-scale"))):
        z = _LowRankLinear.apply(x2, xl2, W, bias, B, A, g, saves == "recompute")
        return z.view(*x.shape[:-1], z.shape[-1])
    h = (A @ (x2 if xl2 is None else xl2).T).T  # tokens × R, as _LowRankLinear computes it (faster too)
    if g is None:
        y = _plus_lowrank(W, _base_linear(W, x2, bias), h, B)
    else:
        y = _plus_lowrank(W, _base_linear(W, x2, None), h, B)
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

    (1 where that is not a finite positive number: a zero norm, whose component has
    nothing to cancel, or an over/underflow). ``t`` is held constant in autograd: the
    product does not depend on it, so gradients are exact. 12 small ops (it runs every
    forward of a residualized layer): the unselected inf/NaN of ``torch.where`` are discarded.
    """
    t = ((A.detach().norm(dim=1) / B.detach().norm(dim=0)) * (B0.norm(dim=0) / A0.norm(dim=1))).sqrt()
    t = torch.where(torch.isfinite(t) & (t > 0), t, 1.0)
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
        keep = min(keep, int(max_rank))
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
