"""The adapted layer: a frozen base module plus the composed adapter (docs/design.md).

    ΔW(θ)  = B'A'                         (normalizer applied to generated slots)
    W_eff  = M(W̄ + ΔW(θ) − ΔW(θ0))         (residualized: W_eff = W̄ at step 0)
    y      = g ⊙ (W̄ x + [B't − B0', B0'] ([A'/t; A'/t − A0'] x)) + b   g = 1 without a magnitude head

The frozen initial factors ``(B0', A0')`` are kept (they are small) instead of
rewriting ``W̄``: the base weight is never touched until ``merge``, identity at
init is exact in every dtype, and ``W̄`` is always available for export. ``t``
rebalances each rank-1 component like its initial one so that nothing large
cancels in fp32 (``functional.residual_factors``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional, outputs
from .layer_kinds import FrozenWeight, LayerKind
from .primitives import FACTOR_NAMES, Composition, MergeError, Role, Slot, SlotsModule


class MergePlan(NamedTuple):
    """A checked merge (:meth:`AdaptedLayer.check_merge`): the factors, computed once, and
    whether ``|W_eff|`` is bounded within the base dtype (no second check when writing)."""

    factors: tuple[Tensor, Tensor, Tensor | None]
    bounded: bool


class AdaptedLayer(nn.Module):
    # buffers registered in __init__ (declared so type checkers know they are tensors)
    row_sq_norm: Tensor | None
    residual_B: Tensor
    residual_A: Tensor
    base: Any
    slots: SlotsModule

    def __init__(self, base: nn.Module, kind: LayerKind, rank: int, composition: Composition,
                 rng: torch.Generator, *, dtype: torch.dtype | None = None, dropout: float = 0.0,
                 restore_residual: bool | None = None):
        """``restore_residual`` (not None) builds the layer for a checkpoint load
        (``lorakit.core.load``): the initializer is not run — an SVD or LU per layer —
        and the slots get placeholder values that the load overwrites together with
        the residual buffers, which exist as the checkpoint says."""
        super().__init__()
        generator, normalizer, init, magnitude = (composition.generator, composition.normalizer,
                                                  composition.init, composition.magnitude)
        self.base = base
        self.dropout = dropout  # PEFT's lora_dropout: on the adapter branch's input, in training only
        self.kind = kind
        self.rank = rank
        self.normalizer = normalizer
        self.magnitude = magnitude
        self.merged = False
        # set by Adapter.apply: one immutable record all its layers share (adapter_config(model))
        self.adapter_config: Mapping[str, Any] = {}  # empty until apply; never changed in place
        self.disabled = False
        # what the fused DoRA linear keeps for backward (functional.DORA_SAVES_OPTIONS): an argument
        # per layer, not a global; "pre-scale" for a model that edits a layer's output in place
        self.dora_saves = "output"
        self._cache: tuple[tuple, tuple[Tensor, Tensor, Tensor | None]] | None = None
        # a kind that provides it (a plain nn.Linear's weight, a quantized base's kernels) gets
        # the one-node fused path (functional.linear_lowrank); any other module goes through
        # its kind's linear and lowrank. A static decision (getattr: a duck-typed plugin kind)
        self.fused = getattr(kind, "fused_weight", lambda _: None)(base) is not None
        # integer inputs (nn.Embedding); getattr: a plugin's kind may predate the attribute
        self.indices = bool(getattr(kind, "indices", False))

        W = kind.matrix(base).detach()
        dtype = dtype or (torch.float64 if W.dtype == torch.float64 else torch.float32)
        W = W.to(dtype)
        on_meta = W.is_meta  # only for a checkpoint load (restore_residual set; Adapter._wrap checks)
        if on_meta:
            # placeholders from a finite stand-in of W̄'s shape (no out × in allocation): every
            # value, row_sq_norm included, is the checkpoint's once the model is materialized
            # and loaded again; _wrap then moves the layer to meta
            W = torch.ones((), dtype=dtype).expand(W.shape)
        out_f, in_f = self.shape = tuple(W.shape)
        # every primitive's output is checked as it comes (outputs.expect): a plugin's
        # NaN or wrong shape is an error at apply naming it, not a wrong model later
        initial = init.factors(W, rank, normalizer.initial_scale(rank), rng) if restore_residual is None else (
            # small random factors: every normalizer and generator computes finite values from them
            torch.randn(out_f, rank, generator=rng, dtype=dtype) / rank, torch.ones(rank, dtype=dtype),
            torch.randn(rank, in_f, generator=rng, dtype=dtype) / in_f ** 0.5)
        B0, d0, A0 = outputs.expect_tuple(init, "factors()", initial, 3)
        shapes = {Role.A: (rank, in_f), Role.B: (out_f, rank), Role.D: (rank,)}
        # standard strides (an initializer may return a transposed view): a checkpoint load
        # builds from placeholders, and equal values must compute bit-identically
        slots = {name: Slot(outputs.expect(init, f"{name}0", value, shapes[role]).to(dtype)
                            .clone(memory_format=torch.contiguous_format),
                            generator.trainable_factors.get(name, False), role)
                 for (role, name), value in zip(FACTOR_NAMES.items(), (A0, B0, d0))}
        initial_factors = {name: slot.value for name, slot in slots.items()}
        slots.update(outputs.expect_slots(normalizer, normalizer.slots_at_init(W, rank, initial_factors)))
        # ‖W̄_i‖², kept only for a magnitude head that declares it needs them (a None buffer is not saved)
        self.register_buffer("row_sq_norm", W.square().sum(dim=1) if magnitude is not None
                             and magnitude.uses_row_norms else None)
        if magnitude is not None:
            slots.update(outputs.expect_slots(magnitude, magnitude.slots(W, self.row_sq_norm)))
        # a load overwrites every tensor of the module: a generator may skip its init (build_for_load)
        build = generator.build if restore_residual is None else getattr(generator, "build_for_load", generator.build)
        self.slots = outputs.expect_slots_module(generator, build(slots, rng))
        with torch.no_grad():
            values = outputs.expect_slots(generator, self.slots(), {n: s.value for n, s in slots.items()})
            B0n, A0n = outputs.expect_tuple(normalizer, "factors()", normalizer.factors(values, rank), 2)
            R = B0n.shape[-1] if isinstance(B0n, Tensor) and B0n.dim() == 2 else rank  # 2r for some
            outputs.expect(normalizer, "B'", B0n, (out_f, R))
            outputs.expect(normalizer, "A'", A0n, (R, in_f))
        # Residualize only when the initial update is non-zero (a static decision).
        self.residual = bool(B0n.abs().amax() > 0 and A0n.abs().amax() > 0) if restore_residual is None \
            else restore_residual
        if self.residual:
            self.register_buffer("residual_B", B0n.detach().clone(memory_format=torch.contiguous_format))
            self.register_buffer("residual_A", A0n.detach().clone(memory_format=torch.contiguous_format))
        if magnitude is not None and not on_meta:  # on meta, row_scale reads a W̄ with no values
            with torch.no_grad():
                outputs.expect(magnitude, "row_scale()", self.factors()[2], (out_f,))

    # -- math --------------------------------------------------------------------
    def factors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Effective ``(B, A, g)``: ``W_eff = diag(g)·(W̄ + B A)``, ``g`` None without
        a magnitude head. Generated slots are evaluated once per call.

        In eval mode without autograd the result is cached (a generator's MLP runs
        once, not once per forward), keyed on the identity and version counter of
        every tensor it depends on: an optimizer step, an in-place edit, EMA or a
        load bumps a counter and the next call recomputes. Under ``torch.compile``
        the cache is bypassed: a Python attribute holding graph tensors would add
        guards and recompiles, and inside a compiled graph the factors cost a few
        small kernels.

        Under ``torch.autocast`` they are computed with autocast off, in the adapter's
        dtype (fp32 masters; DoRA's row norms in fp32, as PEFT's): only the GEMMs with
        activations take the autocast dtype (:func:`functional.linear_lowrank`).
        """
        device = self._device_type()
        if functional.autocast_on(device):  # no context manager otherwise: this runs every forward
            with torch.autocast(device, enabled=False):
                return self._factors()
        return self._factors()

    def _device_type(self) -> str:
        """Where the adapter computes: the base weight's device (every built-in kind has one)."""
        w = getattr(self.base, "weight", None)
        if isinstance(w, Tensor):
            return w.device.type
        return next(iter([*self.slots.parameters(), *self.slots.buffers()])).device.type

    def _factors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        cacheable = not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cacheable:
            key = self._inputs_key()
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        s = self.slots()
        B, A = self.normalizer.factors(s, self.rank)
        if self.residual:
            B, A = functional.residual_factors(B, A, self.residual_B, self.residual_A)
        A = self.kind.restrict(self.base, A)  # e.g. an embedding's padding row: its update stays exactly 0
        g = None
        if self.magnitude is not None:
            # W̄ as an operator, not a dense tensor: a quantized kind applies its own
            # kernel to A's rows instead of dequantizing out × in every step
            W = FrozenWeight.of(self.kind, self.base, (self.shape[0], self.shape[1]))
            g = self.magnitude.row_scale(s, W, self.row_sq_norm, B, A)
        if cacheable:
            self._cache = (key, (B, A, g))
        return B, A, g

    def _inputs_key(self) -> tuple:
        """Identity, storage and version of every tensor ``factors()`` reads.

        In-place updates (optimizer steps, ``copy_``, EMA) bump ``_version``;
        ``p.data = t`` changes the storage; replacing a module or parameter
        changes the identity.
        """
        tensors = [*self.slots.parameters(), *self.slots.buffers(), *self.buffers(recurse=False)]
        if self.magnitude is not None:
            tensors.extend(self.kind.frozen_tensors(self.base))
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors)

    def slot_value(self, role: Role) -> Tensor | None:
        """The current value of the (first) slot with ``role``, None if there is none."""
        names = self.slots.names_with(role)
        return self.slots()[names[0]] if names else None

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return self.base(x)
        B, A, g = self.factors()
        # static decisions (the training flag is a guard under torch.compile); x_d is x otherwise
        dropping = self.training and self.dropout > 0 and not self.indices
        x_d = F.dropout(x, self.dropout, training=True) if dropping else x
        W = self.kind.fused_weight(self.base) if self.fused and x.dtype == A.dtype and (g is None or not dropping) \
            else None
        # under autocast a quantized base's kernels keep their own dtype rules: the generic path there
        if W is not None and (isinstance(W, Tensor) or not functional.autocast_on(x.device.type)):
            return functional.linear_lowrank(x, W, self.kind.fused_bias(self.base, x), B, A, g, x_low=x_d,
                                             saves=self.dora_saves)
        # An adapter kept in fp32 on a bf16/fp16 base computes its term in its own dtype
        # (under autocast: in the autocast dtype, its ops cast); the sum takes the dtype the
        # base module gives. Integer inputs (an embedding) are neither cast nor dropped.
        delta = self.kind.lowrank(self.base, x if self.indices else x_d.to(A.dtype), B, A)
        if g is None:
            return self._added(x, delta)
        if not dropping:
            return self._row_scaled(x, delta, g)
        return self._row_scaled_dropped(x, x_d, delta, g)

    def _added(self, x: Tensor, delta: Tensor) -> Tensor:
        """``base(x) + ΔW x``."""
        y = self.base(x)
        return y + delta.to(y.dtype)

    def _row_scaled(self, x: Tensor, delta: Tensor, g: Tensor) -> Tensor:
        """``g ⊙ (W̄ x + ΔW x) + b``: a magnitude head."""
        y = self.kind.linear(self.base, x)
        return self.kind.add_bias(self.base, self.kind.scale_rows(y + delta.to(y.dtype), g)).to(y.dtype)

    def _row_scaled_dropped(self, x: Tensor, x_d: Tensor, delta: Tensor, g: Tensor) -> Tensor:
        """DoRA with dropout as PEFT defines it (peft/tuners/lora/dora.py): only the dropped
        input takes the magnitude-scaled path, ``W̄(x − x_d) + g ⊙ (W̄ x_d + ΔW x_d) + b``,
        which is :meth:`_row_scaled` again when ``x_d = x``."""
        y = self.kind.linear(self.base, x_d)
        y = self.kind.scale_rows(y + delta.to(y.dtype), g)
        return self.kind.add_bias(self.base, self.kind.linear(self.base, x - x_d) + y).to(y.dtype)

    @property
    def dora_saves(self) -> str:
        """What the fused DoRA linear keeps for backward, one of
        ``functional.DORA_SAVES_OPTIONS`` (``"recompute"``: nothing tokens × out, one more
        base GEMM); checked when set, so a typo is an error on every kind of layer."""
        return self._dora_saves

    @dora_saves.setter
    def dora_saves(self, value: str) -> None:
        if value not in functional.DORA_SAVES_OPTIONS:
            raise ValueError(f"dora_saves={value!r}: use one of {functional.DORA_SAVES_OPTIONS} "
                             "(AdaptedLayer.dora_saves)")
        self._dora_saves = value

    @property
    def weight(self) -> Tensor:
        """The base module's weight: model code reads ``self.wo.weight.dtype`` (T5's
        feed-forward) through the wrapper, as PEFT's layers allow."""
        return self.base.weight

    def train(self, mode: bool = True):
        self._cache = None  # not needed for correctness (the key is); frees the tensors
        return super().train(mode)

    # -- merge -------------------------------------------------------------------
    @torch.no_grad()
    def effective_weight(self, factors: tuple[Tensor, Tensor, Tensor | None] | None = None) -> Tensor:
        """``W_eff = diag(g)(W̄ + B A)`` in the adapter's dtype (fp32, or fp64): one out × in
        tensor, built in place (a copy of ``W̄``, ``addmm_``, a row scaling). ``factors``:
        ``self.factors()`` when the caller has them already (in training mode they are not
        cached, and DoRA's norm costs an out × in × R product)."""
        B, A, g = factors or self.factors()
        with functional.autocast_off(self._device_type()):  # merged inside an autocast region: still fp32
            V = self.kind.matrix(self.base).to(A.dtype, copy=True).addmm_(B, A)
        return V if g is None else V.mul_(g[:, None])

    @torch.no_grad()
    def merged_weight(self, name: str = "", factors: tuple[Tensor, Tensor, Tensor | None] | None = None
                      ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """What :meth:`merge` writes: ``W_eff`` cast to the base dtype, plus the base rows
        that :meth:`unmerge` cannot get back from it as ``(row indices, rows)``: rows
        where ``W̄ = W_eff / g − B A`` would divide by ``g = 0`` (a DoRA magnitude of 0).

        Raises :class:`MergeError`, writing nothing, when ``W_eff`` is non-finite or
        does not fit the base dtype (an fp16 base would store inf).
        """
        where = f"module {name!r}: " if name else ""
        W = self.kind.matrix(self.base)
        factors = factors or self.factors()
        W_eff = self.effective_weight(factors)
        if not functional.all_finite(W_eff):
            raise MergeError(f"merge refused: {where}the adapted weight has non-finite values; no base weight "
                             "was changed. Check the adapter's parameters for NaN/inf.")
        merged = W_eff.to(W.dtype)
        if merged is not W_eff and not functional.all_finite(merged):  # same dtype: checked just above
            raise MergeError(f"merge refused: {where}the adapted weight reaches {W_eff.abs().max().item():.4g}, "
                             f"beyond {W.dtype}'s range (max {torch.finfo(W.dtype).max:.4g}); no base weight was "
                             "changed. Keep the adapter unmerged, or merge a float32 copy of the model.")
        g = factors[2]
        if g is None:
            return merged, None
        lo, hi = torch.aminmax(merged, dim=1)  # each row's largest |value| without an out × in |merged|
        lost = ~torch.isfinite(torch.maximum(hi, -lo).to(g.dtype) / g.abs())  # g = 0, or so small W/g overflows
        return merged, self._kept_rows(W, lost)

    def _kept_rows(self, W: Tensor, lost: Tensor) -> tuple[Tensor, Tensor] | None:
        rows = lost.nonzero().flatten()
        return (rows, W[rows].clone()) if len(rows) else None

    @torch.no_grad()
    def check_merge(self, name: str = "") -> MergePlan:
        """Raise :class:`MergeError` exactly when :meth:`merged_weight` would, cheaply when
        possible: every entry of ``W_eff = diag(g)(W̄ + B A)`` is bounded by

            |W_eff_ij| ≤ |g_i| · (max_kl |W̄_kl| + Σ_k |B_ik| · max_j |A_kj|)

        (one fused ``aminmax`` over ``W̄``, no out × in allocation). A finite bound below
        half the base dtype's maximum (margin for rounding) means ``merged_weight`` cannot
        fail; otherwise (NaN, inf, or large values) it runs and decides. Returns the
        factors it checked, for :meth:`merge` (computed once per layer)."""
        B, A, g = factors = self.factors()
        W = self.kind.matrix(self.base)
        lo, hi = torch.aminmax(W)  # one reduction; per-row (dim=1) is ~14x slower on CPU
        with functional.autocast_off(self._device_type()):
            rows = torch.maximum(hi, -lo).to(A.dtype) + B.abs() @ A.abs().amax(dim=1)
        bound = float((rows if g is None else rows * g.abs()).amax())  # NaN propagates: not finite
        bounded = math.isfinite(bound) and bound < torch.finfo(W.dtype).max / 2
        if not bounded:
            self.merged_weight(name, factors)
        return MergePlan(factors, bounded)

    @torch.no_grad()
    def merge(self, name: str = "", plan: MergePlan | None = None) -> None:
        """Write ``W_eff`` (computed in fp32) into the base weight, or raise
        :class:`MergeError` and change nothing (see :meth:`merged_weight`). ``plan``:
        what :meth:`check_merge` returned for this layer (else it runs here).

        Within the bound of :meth:`check_merge` the write is one out × in temporary
        (``W_eff`` in the adapter's dtype, copied into the weight) and nothing else: no
        finiteness pass (the bound is one), and the rows :meth:`unmerge` cannot restore
        are those of ``g = 0`` (with ``|W_eff_i| ≤ |g_i|·U_i`` and ``U_i`` finite,
        ``W_eff_i / g_i`` overflows nowhere else). A plain ``nn.Linear`` in the adapter's
        dtype without a magnitude head takes ``W̄ += B A`` in place (``addmm_``): no
        temporary at all, the same values."""
        if self.merged:
            return
        plan = plan or self.check_merge(name)
        B, A, g = plan.factors
        W = self.kind.fused_weight(self.base) if self.fused else None  # a dense one is matrix and set_matrix's target
        if plan.bounded and g is None and isinstance(W, Tensor) and not self.kind.quantized and W.dtype == A.dtype:
            self._merged_with: tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, Tensor] | None] = (
                B.clone(), A.clone(), None, None)
            with functional.autocast_off(self._device_type()):
                W.data.addmm_(B, A)  # W_eff in place: one op, no out × in temporary, effective_weight's values
            self.merged = True
            return
        if plan.bounded:
            merged = self.effective_weight(plan.factors)
            lost = None if g is None else self._kept_rows(self.kind.matrix(self.base), g == 0)
        else:
            merged, lost = self.merged_weight(name, plan.factors)
        self._merged_with = (B.clone(), A.clone(), None if g is None else g.clone(), lost)
        self.kind.set_matrix(self.base, merged.to(self.kind.matrix(self.base).dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W̄ = W_eff / g − B A`` with the factors used at merge time (to within
        rounding, docs/design.md), and the rows kept where ``g = 0``."""
        if not self.merged:
            return
        B, A, g, lost = self._merged_with
        dtype = self.kind.matrix(self.base).dtype
        W = self.kind.matrix(self.base).to(A.dtype)
        if g is not None:
            W = W / g[:, None]  # inf/NaN in the rows of g = 0, replaced just below
        with functional.autocast_off(self._device_type()):
            W = (W - B @ A).to(dtype)
        if lost is not None:
            W[lost[0]] = lost[1]
        self.kind.set_matrix(self.base, W)
        self.merged = False
        del self._merged_with

    def extra_repr(self) -> str:
        dropout = f", dropout={self.dropout}" if self.dropout else ""
        return f"rank={self.rank}, residual={self.residual}, merged={self.merged}{dropout}"
