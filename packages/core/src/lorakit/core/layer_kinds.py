"""How an adapter sees a base layer as a matrix ``W̄`` (out × in) and applies factors.

A layer kind is registered through the ``lorakit_layers`` hook per module type, so
transformers' ``Conv1D`` (weight stored in × out) or a third party's quantized linear
plug in without touching the adapted layer, or per tensor type: a ``torch.Tensor``
subclass held as a module's ``weight`` (torchao's ``NF4Tensor`` or ``Int8Tensor`` inside
a plain ``nn.Linear``). The registry resolves the weight's type first, then the
module's (``registry.layer_kind``); a kind keyed by a tensor type says in :meth:`check`
which modules it adapts. :func:`plain_tensors` opens such a weight into the plain
tensors that hold its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional
from .primitives import AdapterError


class LayerKind:
    """Matrix view of one base module type. Methods never allocate out × in tensors
    except :meth:`matrix` callers that merge."""

    exports: frozenset[str] = frozenset({"peft"})
    """The standard LoRA layouts this kind's factors can be written in: ``"peft"`` (PEFT's
    layout for the module type, :meth:`peft_factors`), ``"diffusers"`` and ``"kohya"``
    (files holding ``nn.Linear``/``nn.Conv2d`` layers). Exporters ask this, never the
    module's class."""

    fan_in_fan_out = False
    """True when the base stores its weight in × out (transformers' ``Conv1D``): PEFT's
    ``fan_in_fan_out`` option."""

    indices = False
    """True when the module's input is integer indices (``nn.Embedding``): no dropout on
    it (PEFT applies none to embeddings), no cast to the adapter's dtype, and the
    low-rank term takes the weight's dtype instead of the input's."""

    peft_keys = ("lora_A.weight", "lora_B.weight")
    """The names PEFT gives ``(A, B)`` under the module's name (its embedding layer
    keeps them as bare parameters: ``lora_embedding_A``/``lora_embedding_B``)."""

    quantized = False
    """True when ``matrix`` dequantizes: the weight cannot take ``W_eff`` in place, and
    per-step code must go through :meth:`weight_times_t`, never :meth:`matrix`."""

    def matrix(self, base: nn.Module) -> Tensor:
        raise NotImplementedError

    def weight_times_t(self, base: nn.Module, M: Tensor) -> Tensor:
        """``W̄ Mᵀ`` (out × R) for an R × in ``M``, in ``M``'s dtype: the frozen weight
        as an operator. A quantized kind overrides it with its own kernel so the per-step
        magnitude norm never dequantizes ``W̄`` into an out × in tensor."""
        return functional.dense_times_t(self.matrix(base), M)

    def fused_weight(self, base: nn.Module) -> Tensor | functional.BaseOperator | None:
        """What the one-node fused linear multiplies by (:func:`functional.linear_lowrank`: one
        autograd node whose backward keeps nothing of ``W̄``, the rank-R products in fast
        layouts, the two input gradients summed in place): the dense out × in weight, an
        operator for a frozen quantized weight (:class:`KernelOperator`: the kind's
        :meth:`linear` forward and :meth:`linear_t` backward), or None (default): the layer
        takes the generic path, :meth:`linear` + :meth:`lowrank` traced by autograd. Only for
        a module that is ``x W̄ᵀ + b`` over the input's last dimension."""
        return None

    def fused_bias(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """The bias the fused linear adds to ``W̄ x`` (and trains, where it is trained): the
        module's, as its own forward is about to hold it for ``x`` (a kind whose module
        recasts its bias in place on first use does that here first)."""
        return getattr(base, "bias", None)

    def linear_t(self, base: nn.Module, gy: Tensor) -> Tensor:
        """``gy W̄`` (tokens × in, a new tensor): the input gradient of :meth:`linear`, for a
        kind whose :meth:`fused_weight` is a :class:`KernelOperator`."""
        raise NotImplementedError

    def frozen_tensors(self, base: nn.Module) -> tuple[Tensor, ...]:
        """The tensors holding ``W̄``: their identity and version key cached factors."""
        return (self.matrix(base),)

    def prepare(self, base: nn.Module) -> None:
        """Called once at apply, after :meth:`check`: make the frozen module keep its
        weight bytes as they are (default: nothing to do)."""

    def float_module(self, base: nn.Module, W: Tensor) -> nn.Module:
        """A quantized kind: the float module ``merge_and_unload`` puts in place of
        ``base``, holding ``W`` (out × in, compute dtype) and ``base``'s bias."""
        raise NotImplementedError

    def requantize(self, base: nn.Module, W: Tensor) -> dict:
        """A quantized kind: write ``W`` into ``base``'s quantized weight; return the
        error that adds (``{"max_abs_error": ..., "rel_fro_error": ...}``)."""
        raise NotImplementedError

    def quantized_state(self, base: nn.Module) -> object:
        """A quantized kind: what :meth:`requantize` replaces (references, no copy), so
        :meth:`restore_quantized_state` can put ``base`` back bit-identical."""
        raise NotImplementedError

    def restore_quantized_state(self, base: nn.Module, state: object) -> None:
        raise NotImplementedError

    def set_matrix(self, base: nn.Module, W: Tensor) -> None:
        raise NotImplementedError

    def linear(self, base: nn.Module, x: Tensor) -> Tensor:
        """``W̄ x`` without bias."""
        raise NotImplementedError

    def lowrank(self, base: nn.Module, x: Tensor, B: Tensor, A: Tensor) -> Tensor:
        """``B (A x)`` in the layer's geometry."""
        raise NotImplementedError

    def scale_rows(self, y: Tensor, g: Tensor) -> Tensor:
        """Multiply output channel i of ``y`` by ``g_i``."""
        return y * g.to(y.dtype)

    def add_bias(self, base: nn.Module, y: Tensor) -> Tensor:
        bias = getattr(base, "bias", None)
        return y if bias is None else y + bias

    def check(self, base: nn.Module) -> str | None:
        """A reason this module cannot be adapted, or None."""
        return None

    def restrict(self, base: nn.Module, A: Tensor) -> Tensor:
        """The effective ``A'`` (R × in) with the input columns the module never updates
        set to 0, so ``ΔW = B'A'`` is exactly 0 there in the forward, the gradient, merge
        and export alike (default: every column is updated, ``A'`` as it is)."""
        return A

    def peft_factors(self, base: nn.Module, B: Tensor, A: Tensor, m: Tensor | None):
        """``(lora_B, lora_A, magnitude)`` shaped as PEFT stores them for this layer type."""
        return B, A, m


class LinearKind(LayerKind):
    exports = frozenset({"peft", "diffusers", "kohya"})

    def matrix(self, base):
        return base.weight

    def set_matrix(self, base, W):
        base.weight.data.copy_(W)

    def linear(self, base, x):
        return F.linear(x, base.weight)

    def lowrank(self, base, x, B, A):
        return F.linear(F.linear(x, A), B)

    def fused_weight(self, base):
        # the dense weight, unless the module's forward or a subclass' math is not F.linear's
        plain = (type(base).forward is nn.Linear.forward and type(self).linear is LinearKind.linear
                 and type(self).lowrank is LinearKind.lowrank)
        return base.weight if plain else None


@dataclass(frozen=True)
class KernelOperator:
    """A frozen quantized base as the fused linear's :class:`functional.BaseOperator`, through
    its kind: ``linear(x, True)`` is the module's own forward (its bias included: bit for bit
    what the generic path computes), ``linear(x, False)`` is :meth:`LayerKind.linear`, and
    ``linear_t(gy) = gy W̄`` is :meth:`LayerKind.linear_t`. Called inside the fused node (no
    autograd): nothing of ``W̄`` is kept for backward, where a quantized module's own autograd
    keeps its input or a dequantized copy."""

    kind: LayerKind
    base: nn.Module

    def linear(self, x: Tensor, with_bias: bool) -> Tensor:
        return self.base(x) if with_bias else self.kind.linear(self.base, x)

    def linear_t(self, gy: Tensor) -> Tensor:
        return self.kind.linear_t(self.base, gy)


class ConvKind(LayerKind):
    """An N-d convolution: ``W̄`` is the kernel flattened to out × (in·k1·…·kN); ``A``
    is a conv with the base's geometry producing r channels, ``B`` a 1×…×1 conv (as
    PEFT and diffusers). Subclasses set ``dims``."""

    exports = frozenset({"peft", "diffusers", "kohya"})
    dims = 2
    _convs = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def _channels(self, t: Tensor) -> Tensor:
        """``t`` (out,) or (out, r) shaped to broadcast over the spatial dimensions."""
        return t.reshape(*t.shape, *(1,) * self.dims)

    def matrix(self, base):
        return base.weight.flatten(1)

    def set_matrix(self, base, W):
        base.weight.data.copy_(W.view_as(base.weight))

    def _conv(self, base, x, weight):
        return self._convs[self.dims](x, weight, None, base.stride, base.padding, base.dilation)

    def linear(self, base, x):
        return self._conv(base, x, base.weight)

    def lowrank(self, base, x, B, A):
        h = self._conv(base, x, A.view(A.shape[0], *base.weight.shape[1:]))
        return self._convs[self.dims](h, self._channels(B))

    def scale_rows(self, y, g):
        return y * self._channels(g.to(y.dtype))

    def add_bias(self, base, y):
        return y if base.bias is None else y + self._channels(base.bias)

    def peft_factors(self, base, B, A, m):
        if any(d != 1 for d in base.dilation):  # PEFT builds lora_A without the base's dilation
            raise AdapterError(f"a {type(base).__name__} with dilation {tuple(base.dilation)} has no PEFT/diffusers "
                               "LoRA equivalent; leave it out of the targets")
        m = None if m is None else self._channels(m.reshape(1, -1))
        return self._channels(B), A.reshape(A.shape[0], *base.weight.shape[1:]), m

    def check(self, base):
        if base.groups != 1:
            return (f"a grouped convolution (groups={base.groups}) is not supported: W̄ + BA of its kernel is "
                    "not a grouped kernel, so it could not merge or export exactly (PEFT's grouped-conv LoRA "
                    "cannot merge either); leave it out of the targets")
        if base.padding_mode != "zeros":
            return f"padding_mode={base.padding_mode!r} is not supported; use 'zeros'"
        return None


class Conv1dKind(ConvKind):
    dims = 1


class Conv2dKind(ConvKind):
    dims = 2


class Conv3dKind(ConvKind):
    dims = 3


class EmbeddingKind(LayerKind):
    """``nn.Embedding`` as PEFT's embedding LoRA: ``W̄ = weightᵀ`` (embedding_dim ×
    num_embeddings, "in" is the vocabulary), so ``W̄ onehot(x) = weight[x]`` and the
    low-rank term ``B (A onehot(x))`` is ``embedding(x, Aᵀ) Bᵀ``. PEFT stores ``A``
    (r × num_embeddings) and ``B`` (embedding_dim × r) as they are here.

    ``padding_idx = p``: column ``p`` of ``A'`` is 0 (:meth:`restrict`), so
    ``ΔW[:, p] = B'A'[:, p] = 0`` exactly: the padding row's output, its merged weight
    and the export keep ``W̄[:, p]`` bit-identical whatever the initializer put in
    ``A[:, p]`` (PEFT gets the same from ``lora_embedding_A = 0`` at init and no
    gradient through the padding row; full fine-tuning from the latter). A magnitude
    head scales the whole output row ``i`` by ``g_i``, padding entry included, as
    PEFT's DoRA does: ``W_eff[:, p] = g ⊙ W̄[:, p]``, which stays 0 for the zero
    padding row ``nn.Embedding`` and transformers initialize."""

    indices = True
    peft_keys = ("lora_embedding_A", "lora_embedding_B")

    def matrix(self, base):
        return base.weight.T

    def set_matrix(self, base, W):
        base.weight.data.copy_(W.T)

    def linear(self, base, x):
        return F.embedding(x, base.weight, base.padding_idx)

    def lowrank(self, base, x, B, A):
        # A's padding column is 0 already (restrict); padding_idx as PEFT's forward
        return F.embedding(x, A.T, base.padding_idx) @ B.T

    def restrict(self, base, A):
        if base.padding_idx is None:
            return A
        return A.index_fill(1, torch.tensor([base.padding_idx], device=A.device), 0)

    def peft_factors(self, base, B, A, m):
        # the export's A has the padding column exactly 0 too (not an SVD's rounding of 0)
        return B, self.restrict(base, A), m

    def check(self, base):
        if base.max_norm is not None:  # renormalizes the rows it reads in place: no fixed W̄ to adapt
            return "an nn.Embedding with max_norm is not supported"
        if type(base).forward is not nn.Embedding.forward:  # e.g. a scaled embedding: W̄ x is not its output
            return f"{type(base).__name__} overrides nn.Embedding.forward; register a layer kind for it"
        return None


class LazyKind:
    """A layer kind registered without importing the library whose type it adapts:
    ``factory()`` builds the real kind at the first lookup that finds it
    (``Registry.layer_kind`` returns that kind, never this). Registered under a type's
    qualified name (``"pkg.module.Type"``), it lets a plugin load without importing its
    library (torchao's import takes ~2 s). ``package``: the library, named in errors."""

    quantized = True  # what the lookups that list kinds ask (adapter._quantized_hint)

    def __init__(self, factory, *, package: str) -> None:
        self.factory, self.package = factory, package
        self._kind: LayerKind | None = None

    def resolve(self) -> LayerKind:
        if self._kind is None:
            self._kind = self.factory()
        return self._kind


def float_linear(W: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``W`` (and ``bias`` cast to ``W``'s dtype): what a
    quantized kind's ``float_module`` puts in a quantized layer's place on ``merge_and_unload``."""
    dense = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        dense.weight.copy_(W)
        if bias is not None:
            dense.bias.copy_(bias.detach().to(W.dtype))
    return dense


def plain_tensors(t: Tensor) -> dict[str, Tensor]:
    """The plain tensors that hold ``t``: ``{"": t}``, or for a traceable wrapper subclass
    (torchao's ``NF4Tensor``, ``Int8Tensor``) its inner tensors by dotted name
    (``__tensor_flatten__``, recursively). Quantized bytes are compared, copied and
    version-keyed through these, never through the subclass' own ops (an ``NF4Tensor``'s
    ``clone`` requantizes; it has no ``equal``)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        return {"": t}
    out = {}
    for name in t.__tensor_flatten__()[0]:
        for sub, inner in plain_tensors(getattr(t, name)).items():
            out[f"{name}.{sub}" if sub else name] = inner
    return out


@dataclass(frozen=True)
class FrozenWeight:
    """The frozen ``W̄`` of one base module as an operator: what a magnitude head gets
    per step (``Magnitude.row_scale``'s ``weight``). ``times_t(M) = W̄ Mᵀ`` costs what
    the layer's own forward on R rows costs and allocates out × R, never out × in;
    :meth:`dense` is the transient out × in matrix (dequantized for a quantized kind)."""

    kind: LayerKind
    base: nn.Module
    shape: tuple[int, int]

    @classmethod
    def of(cls, kind: LayerKind, base: nn.Module, shape: tuple[int, int]) -> FrozenWeight:
        return cls(kind, base, (int(shape[0]), int(shape[1])))

    def times_t(self, M: Tensor) -> Tensor:
        return self.kind.weight_times_t(self.base, M)

    def dense(self) -> Tensor:
        return self.kind.matrix(self.base)


BUILTIN_KINDS: dict[type, LayerKind] = {nn.Linear: LinearKind(), nn.Conv1d: Conv1dKind(), nn.Conv2d: Conv2dKind(),
                                        nn.Conv3d: Conv3dKind(), nn.Embedding: EmbeddingKind()}
