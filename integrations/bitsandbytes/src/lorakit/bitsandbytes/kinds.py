"""Layer kinds for bitsandbytes' quantized linears: a frozen quantized ``W̄`` seen as a matrix.

    W̄ = dequant(Q)                      (4-bit: blockwise nf4/fp4 codes × absmax;
                                          8-bit: int8 rows × SCB/127)
    y  = g ⊙ (W̄ x + B'(A'x)) + b         the base term is the quantized layer's own forward

What each method costs, and why it keeps the quantized base byte-identical:

- :meth:`matrix` dequantizes into a *transient* out × in tensor. Core calls it at
  apply (initializers, DoRA's ``‖W̄_i‖²``) and at merge/export only; nothing keeps it.
- :meth:`weight_times_t` is ``W̄ Mᵀ`` for DoRA's per-step row norms
  (``‖W̄_i + B'_i A'‖²`` needs ``W̄ A'ᵀ``): the 4-bit layer's own ``matmul_4bit`` on
  ``A'``'s R rows in fp32 (out × R result), the 8-bit weight applied in row blocks —
  never an out × in tensor of lorakit's per step.
- :meth:`fused_weight` gives the one-node fused linear (core ``functional.linear_lowrank``)
  the layer's own kernel forward and :meth:`linear_t` (``gy W̄``) for backward, as for a
  plain ``nn.Linear``: QLoRA and QDoRA keep per layer what LoRA on a float base keeps.
- :meth:`set_matrix` refuses: an in-place merge would requantize. ``merge_and_unload``
  builds a float ``nn.Linear`` (:meth:`float_module`) or, asked to, requantizes
  (:meth:`requantize`) and reports the error added.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from lorakit.core import MergeError
from lorakit.core.layer_kinds import KernelOperator, LayerKind, float_linear

BLOCK_ELEMENTS = 1 << 22  # 8-bit W̄ Mᵀ in row blocks of at most ~4M weights (16 MiB in fp32)


def _error(W_new: Tensor, W: Tensor) -> dict:
    diff = (W_new.double() - W.double())
    return {"max_abs_error": float(diff.abs().max()),
            "rel_fro_error": float(diff.norm() / W.double().norm().clamp_min(1e-300))}


WEIGHT_TYPES = {"Linear4bit": "Params4bit", "Linear8bitLt": "Int8Params"}


def _still_quantized(base, *_args) -> None:
    """Raise a clear error when the quantized weight was replaced behind lorakit's back:
    FSDP2's ``fully_shard`` swaps ``Params4bit``/``Int8Params`` for a DTensor parameter,
    and bitsandbytes would then fail with an unrelated AttributeError."""
    expected = next((w for cls, w in WEIGHT_TYPES.items() if isinstance(base, getattr(bnb.nn, cls))), None)
    if expected and type(base.weight).__name__ != expected:
        raise RuntimeError(
            f"this {type(base).__name__}'s weight is a {type(base.weight).__name__}, no longer a bitsandbytes "
            f"{expected}: FSDP2 (fully_shard) of a quantized base is not supported by lorakit-bitsandbytes. "
            "Use DistributedDataParallel (the quantized base is frozen and replicated; only the adapter's "
            "gradients are reduced), or shard only float modules.")


class _QuantizedLinearKind(LayerKind):
    quantized = True

    def prepare(self, base):
        if not getattr(base, "_lorakit_checked", False):  # once, even if applied again after unload
            base.register_forward_pre_hook(_still_quantized)
            base._lorakit_checked = True

    def lowrank(self, base, x, B, A):
        return F.linear(F.linear(x, A), B)

    def fused_weight(self, base):
        return KernelOperator(self, base)

    def _bias_dtype(self, base, x: Tensor) -> torch.dtype:
        return x.dtype

    def fused_bias(self, base, x):
        # the module's forward casts its bias in place on first use: done before the fused
        # node takes it as an input (else its gradient would come in the old dtype)
        bias, dtype = base.bias, self._bias_dtype(base, x)
        if bias is not None and bias.dtype != dtype:
            bias.data = bias.data.to(dtype)
        return bias

    def frozen_tensors(self, base):
        return (base.weight,)

    def set_matrix(self, base, W):
        raise MergeError(f"a {type(base).__name__} cannot take W_eff in place (it would be requantized); use "
                         "merge_and_unload(model) for a float model or merge_and_unload(model, requantize=True)")

    def float_module(self, base, W):
        return float_linear(W, base.bias)


class Linear4bitKind(_QuantizedLinearKind):
    """``bnb.nn.Linear4bit`` (and ``LinearNF4``/``LinearFP4``): nf4 or fp4, with or without
    double quantization (``compress_statistics``), any compute dtype.

    ``W̄`` is the weight the layer's forward multiplies by: ``dequantize_4bit`` cast to
    the compute dtype. The forward's CPU inference path (AVX512-BF16) repacks
    ``weight.data`` in place and computes in bf16; :meth:`prepare` turns it off for
    adapted layers, so the bytes stay as saved and eval computes what training does.
    """

    def _state(self, base):
        _still_quantized(base)
        return base.weight.quant_state

    def _dtype(self, base):
        return base.compute_dtype or self._state(base).dtype

    def _bias_dtype(self, base, x):
        return base.compute_dtype or x.dtype  # what Linear4bit.forward casts its bias to

    def check(self, base):
        if getattr(base.weight, "quant_state", None) is None:
            return ("this Linear4bit is not quantized yet (no quant_state): load the model with transformers' "
                    "BitsAndBytesConfig, or move it to its device (.to('cpu'/'cuda')) before applying")
        return None

    def prepare(self, base):
        super().prepare(base)
        state = self._state(base)
        if getattr(state, "packing_format_for_cpu", False):  # back to the canonical (saved) layout
            base.weight.data, base.weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(
                base.weight.data, state)
        base.support_avx512bf16_for_cpu = False

    def matrix(self, base):
        state = self._state(base)
        data = base.weight.data
        if getattr(state, "packing_format_for_cpu", False):  # inverse on copies: it edits its arguments
            data, state = bnbF._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnbF.dequantize_4bit(data, state).to(self._dtype(base))

    def linear(self, base, x):
        """``W̄ x``: the forward's own ``matmul_4bit`` without the bias."""
        return bnb.matmul_4bit(x.to(self._dtype(base)), base.weight.t(), quant_state=self._state(base)).to(x.dtype)

    def linear_t(self, base, gy):
        """``gy W̄``, what ``matmul_4bit``'s own backward computes: the weight dequantized in
        the compute dtype for the product and freed (PEFT's QLoRA pays the same). Not in row
        blocks: dequantizing a row range of the packed bytes with its block scales did not
        reproduce those rows of the whole weight's dequantization (bitsandbytes 0.50, CPU)."""
        dtype = self._dtype(base)
        return (gy.to(dtype) @ bnbF.dequantize_4bit(base.weight.data, self._state(base)).to(dtype)).to(gy.dtype)

    def weight_times_t(self, base, M):
        """``W̄ Mᵀ = (M W̄ᵀ)ᵀ``: ``matmul_4bit`` on M's rows in fp32 (out × R)."""
        W = base.weight.t()
        return bnb.matmul_4bit(M.float(), W, quant_state=self._state(base)).T.to(M.dtype)

    def float_module(self, base, W):
        return super().float_module(base, W.to(self._dtype(base)))

    def requantize(self, base, W):
        state = self._state(base)
        data, new_state = bnbF.quantize_4bit(
            W.to(state.dtype), blocksize=state.blocksize, compress_statistics=state.nested,
            quant_type=state.quant_type, quant_storage=base.weight.quant_storage)
        base.weight.data, base.weight.quant_state = data, new_state
        return _error(self.matrix(base), W)

    def quantized_state(self, base):
        return base.weight.data, base.weight.quant_state  # requantize rebinds both, never writes in place

    def restore_quantized_state(self, base, state):
        base.weight.data, base.weight.quant_state = state


class Linear8bitLtKind(_QuantizedLinearKind):
    """``bnb.nn.Linear8bitLt`` with int8 weights (``has_fp16_weights=False``, LLM.int8()).

    ``W̄ = CB ⊙ SCB/127`` row-wise (``int8_vectorwise_dequant``), in fp32. ``CB``/``SCB``
    live on the weight until the first forward moves them to ``base.state``.
    """

    @staticmethod
    def _cb_scb(base):
        _still_quantized(base)
        state = base.state
        CB = state.CB if state.CB is not None else base.weight.data
        SCB = state.SCB if state.SCB is not None else getattr(base.weight, "SCB", None)
        return CB, SCB

    def check(self, base):
        if base.state.has_fp16_weights:
            return ("this Linear8bitLt keeps float weights (has_fp16_weights=True); lorakit adapts quantized "
                    "bases: build it with has_fp16_weights=False (BitsAndBytesConfig(load_in_8bit=True) does)")
        CB, SCB = self._cb_scb(base)
        if CB.dtype != torch.int8 or SCB is None:
            return ("this Linear8bitLt is not quantized yet (no int8 weight and SCB): load the model with "
                    "BitsAndBytesConfig(load_in_8bit=True), or move it to its device before applying")
        return None

    def matrix(self, base):
        CB, SCB = self._cb_scb(base)
        return bnbF.int8_vectorwise_dequant(CB, SCB.to(CB.device))

    def linear(self, base, x):
        """``W̄ x``: the layer's own forward with its bias detached for the call."""
        bias = base.bias
        if bias is None:
            return base(x)
        base.bias = None
        try:
            return base(x)
        finally:
            base.bias = bias

    def linear_t(self, base, gy):
        """``gy W̄`` with ``W̄ = CB ⊙ SCB/127`` formed as bitsandbytes' backward forms it, but
        over row blocks of at most ``BLOCK_ELEMENTS`` weights (it dequantizes all out × in)."""
        CB, SCB = self._cb_scb(base)
        scale = SCB.to(CB.device).unsqueeze(1).mul(1.0 / 127.0)
        step = max(1, BLOCK_ELEMENTS // max(CB.shape[1], 1))
        out = None
        for i in range(0, CB.shape[0], step):
            W = CB[i:i + step].to(gy.dtype).mul_(scale[i:i + step])
            out = gy[:, i:i + step] @ W if out is None else out.addmm_(gy[:, i:i + step], W)
        assert out is not None  # a layer has rows
        return out

    def weight_times_t(self, base, M):
        """``W̄ Mᵀ = diag(SCB/127) (CB Mᵀ)`` in fp32, over row blocks: exact to fp32 and
        at most ``BLOCK_ELEMENTS`` dequantized weights at a time (the layer's forward
        would quantize ``M`` to int8 in eval, which DoRA's norm cannot afford)."""
        CB, SCB = self._cb_scb(base)
        Mt = M.float().T
        step = max(1, BLOCK_ELEMENTS // max(CB.shape[1], 1))
        out = torch.cat([CB[i:i + step].float() @ Mt for i in range(0, CB.shape[0], step)])
        return (out * (SCB.float().to(out.device) / 127)[:, None]).to(M.dtype)

    def requantize(self, base, W):
        CB, SCB, _ = bnbF.int8_vectorwise_quant(W.to(torch.float16))
        base.weight.data = CB
        if base.state.CB is not None:
            base.state.CB, base.state.SCB = CB, SCB
        else:
            base.weight.CB, base.weight.SCB = CB, SCB
        return _error(self.matrix(base), W)

    def quantized_state(self, base):
        weight = base.weight  # requantize rebinds these, never writes in place
        return weight.data, base.state.CB, base.state.SCB, {k: v for k, v in vars(weight).items() if k in ("CB", "SCB")}

    def restore_quantized_state(self, base, saved):
        base.weight.data, base.state.CB, base.state.SCB, attrs = saved
        for key in ("CB", "SCB"):
            if key in attrs:
                setattr(base.weight, key, attrs[key])
            else:
                vars(base.weight).pop(key, None)
