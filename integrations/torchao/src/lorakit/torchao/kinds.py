"""Layer kinds for torchao's quantized weights inside a plain ``nn.Linear``.

torchao keeps the module an ``nn.Linear`` and puts the quantization in the weight's
tensor type, so these kinds are registered for the tensor types (``NF4Tensor``,
``Int8Tensor``); the registry resolves a module's weight type before its module type.

    NF4  (QLoRA, torchtune):   W̄ = nf4[code] · (q_s / f_{⌊b/S⌋} + μ)   per block b of 64 weights
    int8 weight-only:          W̄ = (q − z) · s                          per row (or group)
    y = g ⊙ (W̄ x + B'(A'x)) + b           the base term is torchao's own F.linear

What each method costs, and why the quantized bytes stay as they are:

- :meth:`matrix` dequantizes into a transient out × in tensor: at apply (initializers,
  DoRA's ``‖W̄_i‖²``) and at merge/export only.
- :meth:`weight_times_t` is ``W̄ Mᵀ`` for DoRA's per-step row norms, over row blocks of at
  most ``BLOCK_ELEMENTS`` dequantized weights (out × R result), computed from the same
  inner tensors with the same elementwise operations as torchao's dequantization: never
  an out × in tensor of lorakit's per step.
- :meth:`fused_weight` gives the one-node fused linear (core ``functional.linear_lowrank``)
  torchao's own forward and :meth:`linear_t` (``gy W̄`` over the same row blocks) for
  backward: nothing of ``W̄`` is kept between forward and backward, and no out × in
  tensor is formed (torchao's own backward dequantizes the whole weight).
- :meth:`set_matrix` refuses (an in-place merge would requantize); ``merge_and_unload``
  builds a float ``nn.Linear`` or, asked to, requantizes into the same format with the
  same block sizes and reports the error added.
- :meth:`frozen_tensors` are the plain inner tensors (a wrapper subclass has no storage
  of its own to key the eval cache on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core import MergeError
from lorakit.core.layer_kinds import KernelOperator, LayerKind, float_linear, plain_tensors
from torchao.quantization import Int8Tensor, NF4Tensor, to_nf4
from torchao.quantization.granularity import PerGroup, PerRow, PerTensor
from torchao.quantization.quant_primitives import dequantize_affine

BLOCK_ELEMENTS = 1 << 22  # W̄ Mᵀ over row blocks of at most ~4M weights (16 MiB in fp32)


def _error(W_new: Tensor, W: Tensor) -> dict:
    diff = W_new.double() - W.double()
    return {"max_abs_error": float(diff.abs().max()),
            "rel_fro_error": float(diff.norm() / W.double().norm().clamp_min(1e-300))}


def _row_blocks(rows: int, cols: int, unit: int = 1):
    """``(i, j)`` row ranges covering ``rows`` with at most ~BLOCK_ELEMENTS weights each,
    every range a multiple of ``unit`` rows (but the last)."""
    step = max(unit, (BLOCK_ELEMENTS // max(cols, 1)) // unit * unit)
    return ((i, min(i + step, rows)) for i in range(0, rows, step))


class _WeightSubclassKind(LayerKind):
    """An ``nn.Linear`` whose weight is a torchao tensor subclass (frozen, quantized)."""

    quantized = True
    exports = frozenset({"peft", "diffusers", "kohya"})  # the factors are an nn.Linear's
    weight_type: type = Tensor

    def check(self, base):
        name = self.weight_type.__name__
        if type(base).forward is not nn.Linear.forward:
            return (f"a {type(base).__name__} holding a {name} weight: lorakit-torchao adapts torchao weights "
                    "inside a plain nn.Linear (what torchao's quantize_ and to_nf4 give)")
        if base.weight.dim() != 2:
            return f"a {name} weight of {base.weight.dim()} dimensions; lorakit-torchao adapts 2-d linear weights"
        return None

    def linear(self, base, x):
        """``W̄ x``: torchao's own linear on the quantized weight, without the bias."""
        return F.linear(x, base.weight)

    def lowrank(self, base, x, B, A):
        return F.linear(F.linear(x, A), B)

    def fused_weight(self, base):
        return KernelOperator(self, base)

    @staticmethod
    def rows(w, i: int, j: int) -> Tensor:
        """Rows ``i:j`` of ``W̄``, dequantized as torchao does."""
        raise NotImplementedError

    def row_unit(self, w) -> int:
        """Row blocks are multiples of this many rows (whole quantization blocks)."""
        return 1

    def linear_t(self, base, gy):
        """``gy W̄ = Σ_blocks gy[:, i:j] W̄[i:j]`` over row blocks of at most ``BLOCK_ELEMENTS``
        weights, each dequantized by :meth:`rows` (bit-identical to torchao's rows)."""
        w = base.weight
        out = None
        for i, j in _row_blocks(w.shape[0], w.shape[1], self.row_unit(w)):
            W = self.rows(w, i, j).to(gy.dtype)
            out = gy[:, i:j] @ W if out is None else out.addmm_(gy[:, i:j], W)
        assert out is not None  # a layer has rows
        return out

    def frozen_tensors(self, base):
        return tuple(plain_tensors(base.weight).values())

    def set_matrix(self, base, W):
        raise MergeError(f"a {self.weight_type.__name__} weight cannot take W_eff in place (it would be requantized); "
                         "use merge_and_unload(model) for a float model or merge_and_unload(model, requantize=True)")

    def float_module(self, base, W):
        return float_linear(W, base.bias)

    def quantize_like(self, weight: Tensor, W: Tensor) -> Tensor:
        """``W`` quantized into ``weight``'s format (same block sizes / granularity)."""
        raise NotImplementedError

    def requantize(self, base, W):
        # a new Parameter in place of the old one (kept by quantized_state), never written into
        base._parameters["weight"] = nn.Parameter(self.quantize_like(base.weight, W), requires_grad=False)
        return _error(self.matrix(base), W)

    def quantized_state(self, base):
        return base._parameters["weight"]

    def restore_quantized_state(self, base, state):
        base._parameters["weight"] = state


class NF4Kind(_WeightSubclassKind):
    """torchao's ``NF4Tensor`` (``to_nf4``; QLoRA's 4-bit NormalFloat with double-quantized
    block scales), as torchtune's QLoRA holds it: ``nn.Parameter(to_nf4(w))`` in an
    ``nn.Linear``. ``W̄ = weight.get_original_weight()`` in the weight's dtype; the
    forward is torchao's ``linear_nf4``. Shardable by FSDP2 (``fully_shard``) when every
    rank's rows hold whole scaler blocks (docs/distributed.md)."""

    weight_type = NF4Tensor

    def matrix(self, base):
        return base.weight.get_original_weight()

    @staticmethod
    def rows(w, i: int, j: int) -> Tensor:
        """Rows ``i:j`` of ``W̄``, with the operations ``get_original_weight`` applies to
        them (so bit-identical to its rows); ``i·in`` and ``j·in`` are whole 64-blocks."""
        n, bs = w.shape[1], w.block_size
        b0, b1 = i * n // bs, j * n // bs
        factor = w.quantization_factor[torch.arange(b0, b1, device=w.quantized_scalers.device) // w.scaler_block_size]
        scalers = (w.quantized_scalers[b0:b1] / factor).to(w.dtype) + w.scaler_mean
        data = w.quantized_data[i * n // 2:j * n // 2]
        repeated = scalers.unsqueeze(-1).expand(b1 - b0, bs // 2).flatten()
        first, second = w.nf4[(data >> 4).long()] * repeated, w.nf4[(data & 0b1111).long()] * repeated
        return torch.stack([first, second], dim=-1).reshape(j - i, n)

    def row_unit(self, w) -> int:
        return w.block_size // math.gcd(w.shape[1], w.block_size)

    def weight_times_t(self, base, M):
        """``W̄ Mᵀ`` in fp32 over row blocks, each a whole number of quantization blocks."""
        w = base.weight
        Mt = M.float().T
        out = torch.cat([self.rows(w, i, j).float() @ Mt
                         for i, j in _row_blocks(w.shape[0], w.shape[1], self.row_unit(w))])
        return out.to(M.dtype)

    def quantize_like(self, weight, W):
        return to_nf4(W.to(weight.dtype).contiguous(), weight.block_size, weight.scaler_block_size)


class Int8WeightOnlyKind(_WeightSubclassKind):
    """torchao's ``Int8Tensor`` without activation quantization (``Int8WeightOnlyConfig``:
    per row by default, or per group / per tensor). ``W̄ = weight.dequantize()`` in the
    weight's dtype; the forward is torchao's ``(x qᵀ) · s``."""

    weight_type = Int8Tensor

    def check(self, base):
        w = base.weight
        if getattr(w, "act_quant_kwargs", None) is not None or getattr(w, "act_pre_scale", None) is not None:
            return ("an Int8Tensor weight with activation quantization or pre-scaling (e.g. "
                    "Int8DynamicActivationInt8WeightConfig) quantizes or rescales the input, so its output is not "
                    "W̄x; lorakit-torchao adapts int8 weight-only bases: quantize with Int8WeightOnlyConfig")
        return super().check(base)

    def matrix(self, base):
        return base.weight.dequantize()

    @staticmethod
    def rows(w, i: int, j: int) -> Tensor:
        """Rows ``i:j`` of ``W̄`` (``dequantize_affine`` on the row slice of the quantized
        data and of its per-row/group scales; a per-tensor scale applies as it is)."""
        per_tensor = w.block_size[0] != 1
        scale, zero = w.scale, w.zero_point
        if not per_tensor:
            scale, zero = scale[i:j], None if zero is None else zero[i:j]
        block = [j - i, w.block_size[1]] if per_tensor else list(w.block_size)
        return dequantize_affine(w.qdata[i:j], block, scale, zero, torch.int8, output_dtype=w.dtype)

    def weight_times_t(self, base, M):
        """``W̄ Mᵀ`` in fp32 over row blocks of the dequantized weight."""
        w = base.weight
        Mt = M.float().T
        out = torch.cat([self.rows(w, i, j).float() @ Mt for i, j in _row_blocks(w.shape[0], w.shape[1])])
        return out.to(M.dtype)

    def quantize_like(self, weight, W):
        out_f, in_f = weight.shape
        bs = list(weight.block_size)
        granularity = PerRow() if bs == [1, in_f] else PerTensor() if bs == [out_f, in_f] else PerGroup(bs[1])
        return Int8Tensor.from_hp(W.to(weight.dtype).contiguous(), granularity)
