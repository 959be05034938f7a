"""transformers' fused mixture-of-experts modules as parameter targets (``lorakit.core.experts``).

Every experts class transformers 5 decorates with ``@use_experts_implementation`` declares
its layout in attributes the decorator sets, and that is what lorakit reads:

- Qwen3-MoE, Mixtral, OLMoE: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``; gated,
  ``[gate; up]`` concatenated along out, no bias.
- gpt-oss: ``gate_up_proj (E, H, 2I)`` + ``gate_up_proj_bias (E, 2I)``, ``down_proj (E, I, H)``
  + ``down_proj_bias``; transposed, gate and up interleaved, biased.

``is_transposed`` False: ``W[e]`` is (out, in) and the base computes ``F.linear(x, W[e])``;
True: (in, out) and ``x @ W[e]``. The gate (``_apply_gate``: SiLU-gated product, gpt-oss's
clamped GLU) and the activation are the module's own. Refused with one error: a module
without those flags (no known layout), ``has_post_expert_norm``, expert parallelism, a
parameter that is not one of its weight tensors (a bias stays frozen).

The forward below is the base's own, with each adapted expert's update added on the tokens
routed to that expert: ``eager`` is the base's per-expert loop (``index_add_``), any other
``config._experts_implementation`` (``grouped_mm``, the default) the grouped form: tokens
sorted by expert, the frozen product one ``grouped_mm``, the adapter terms of every routed
expert two more (their factors stacked, ``_batched_terms``; segment by segment where they
cannot be stacked). A zero update therefore computes the base module bit for bit in either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core import AdapterError
from lorakit.core.experts import AdaptedParameters, ExpertLayout, FusedExpertsKind


class DecoratedExperts(nn.Module):
    """Stands, in the layer registry, for every experts class transformers decorates with
    ``@use_experts_implementation`` (the kind :meth:`~TransformersExpertsKind.accepts` them by
    their flags): registering the classes themselves would import every modeling module at
    plugin load. Never instantiated."""


class TransformersExpertsKind(FusedExpertsKind):
    """A ``@use_experts_implementation`` experts module (layout from its decorator flags)."""

    def accepts(self, module: nn.Module) -> bool:
        return all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "num_experts"))

    def _weights(self, module: nn.Module) -> tuple[str, str]:
        if not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
            raise AdapterError(f"{type(module).__name__} declares no experts layout (transformers' "
                               "@use_experts_implementation flags); register a FusedExpertsKind for it")
        if getattr(module, "has_post_expert_norm", False) or getattr(module, "_is_expert_parallel", False):
            raise AdapterError(f"{type(module).__name__} with a post-expert norm or expert parallelism is not "
                               "supported; leave it out of target_parameters")
        return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"

    def parameter_names(self, module):
        return list(self._weights(module))

    def layout(self, module, param):
        names = self._weights(module)
        if param not in names:
            raise AdapterError(f"{type(module).__name__} uses {param!r} in a layout lorakit does not know; its "
                               f"adaptable expert tensors are {list(names)}")
        return ExpertLayout(transposed=bool(module.is_transposed))

    def forward(self, wrapper: AdaptedParameters, hidden_states: Tensor, top_k_index: Tensor,
                top_k_weights: Tensor) -> Tensor:
        if getattr(wrapper.base.config, "_experts_implementation", "eager") in (None, "eager"):
            return _eager(wrapper, hidden_states, top_k_index, top_k_weights)
        return _grouped(wrapper, hidden_states, top_k_index, top_k_weights)


def _bias(base: nn.Module, param: str) -> Tensor | None:
    return getattr(base, f"{param}_bias") if base.has_bias else None


def _eager(wrapper, hidden_states, top_k_index, top_k_weights):
    """The base's eager loop; an adapted expert's product is its AdaptedLayer."""
    base = wrapper.base
    up_name, down_name = wrapper.kind._weights(base)
    up_bias, down_bias = _bias(base, up_name), _bias(base, down_name)
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=base.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = int(e[0])
        if e == base.num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden_states[token_idx]
        h = _product(wrapper, up_name, e, x)
        h = h if up_bias is None else h + up_bias[e]
        h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
        out = _product(wrapper, down_name, e, h)
        out = out if down_bias is None else out + down_bias[e]
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def _product(wrapper, param, e, x):
    layer = wrapper.active(param, e)
    if layer is not None:
        return layer(x)
    W = getattr(wrapper.base, param)[e]
    return x @ W if wrapper.base.is_transposed else F.linear(x, W)


def _grouped(wrapper, hidden_states, top_k_index, top_k_weights):
    """transformers' ``grouped_mm_experts_forward`` with the adapter terms added per segment."""

    base = wrapper.base
    up_name, down_name = wrapper.kind._weights(base)
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    sample_weights, expert_ids = top_k_weights.reshape(-1), top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    x = hidden_states[perm // num_top_k]
    histc_input = expert_ids_g.float() if x.device.type in ("cpu", "mps") else expert_ids_g.int()
    counts = torch.histc(histc_input, bins=base.num_experts, min=0, max=base.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    sizes = [int(c) for c in counts.tolist()]
    h = _grouped_product(wrapper, up_name, x, offsets, sizes, expert_ids_g)
    h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
    out = _grouped_product(wrapper, down_name, h, offsets, sizes, expert_ids_g)
    out = out * sample_weights[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    return out[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _grouped_product(wrapper, param, x, offsets, sizes, expert_ids_g):
    """``W[e] x + bias[e]`` for each token's expert e, with ``g_e ⊙ (W̄_e x + B'_e A'_e x)`` for an
    adapted one (dropout as :class:`AdaptedLayer`: DoRA scales only the dropped input's path)."""
    from transformers.integrations.moe import _grouped_linear

    base = wrapper.base
    W, bias = getattr(base, param), _bias(base, param)
    y = _grouped_linear(x, W, offsets, is_transposed=base.is_transposed)
    if wrapper.active(param, 0) is not None and (batched := _batched_terms(wrapper, param, y, x, offsets, sizes,
                                                                          expert_ids_g)) is not None:
        y = batched
    elif wrapper.active(param, 0) is not None:
        parts, start = [], 0
        for e, n in enumerate(sizes):
            seg, xs = y[start:start + n], x[start:start + n]
            layer = wrapper.active(param, e)
            if n and layer is not None:
                seg = _adapted_segment(layer, seg, xs)
            parts.append(seg)
            start += n
        parts.append(y[start:])  # tokens past the last expert's offset (none without expert parallelism)
        y = torch.cat(parts)
    return y if bias is None else y + bias[expert_ids_g]


def _batched_terms(wrapper, param, base_out, x, offsets, sizes, expert_ids_g):
    """Every routed expert's adapter term at once,

        y_t = g_e ⊙ (W̄_e x_t + B_e (A_e x_t)),   e = the expert of token t (g_e = 1 without a head)

    the factors stacked, ``x A_eᵀ`` and ``(·) B_eᵀ`` two grouped GEMMs over the same segments as
    the base (an unrouted expert: zero factors that need no gradient, so its slots get none and its
    factors are not computed), ``g`` gathered per token. The per-segment formulas of
    :func:`_adapted_segment` to rounding; None where they cannot be stacked (a merged or disabled
    expert, ranks or heads that differ, tokens past the offsets), and the caller computes segment
    by segment."""
    from transformers.integrations.moe import _grouped_linear

    layers = [wrapper.active(param, e) if n else None for e, n in enumerate(sizes)]
    if sum(sizes) != x.shape[0] or any(layer is None for layer, n in zip(layers, sizes) if n):
        return None
    factors = {e: layer.factors() for e, layer in enumerate(layers) if layer is not None}
    if len({(B.shape, A.shape, g is None, A.dtype) for B, A, g in factors.values()}) != 1:
        return None
    B0, A0, g0 = next(iter(factors.values()))
    B = torch.stack([factors[e][0] if e in factors else B0.new_zeros(B0.shape) for e in range(len(sizes))])
    A = torch.stack([factors[e][1] if e in factors else A0.new_zeros(A0.shape) for e in range(len(sizes))])
    pad = -A.shape[1] % 8  # grouped_mm wants 16-byte strides: zero rank components, which add exactly 0
    if pad:
        A, B = F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad))
    layer = next(layer for layer in layers if layer is not None)
    dropping = layer.training and layer.dropout > 0
    x_d = F.dropout(x, layer.dropout, training=True) if dropping else x
    delta = _grouped_linear(_grouped_linear(x_d.to(A.dtype), A, offsets), B, offsets).to(base_out.dtype)
    if g0 is None:
        return base_out + delta
    g = torch.stack([factors[e][2] if e in factors else g0.new_ones(g0.shape) for e in range(len(sizes))])
    g = g[expert_ids_g].to(base_out.dtype)  # (tokens, out): each token's expert's row scale
    if not dropping:
        return (base_out + delta) * g
    W, transposed = getattr(wrapper.base, param), wrapper.base.is_transposed
    scaled = (_grouped_linear(x_d, W, offsets, is_transposed=transposed) + delta) * g
    return _grouped_linear(x - x_d, W, offsets, is_transposed=transposed) + scaled


def _adapted_segment(layer, base_out, x):
    B, A, g = layer.factors()
    dropping = layer.training and layer.dropout > 0
    x_d = F.dropout(x, layer.dropout, training=True) if dropping else x
    delta = layer.kind.lowrank(layer.base, x_d.to(A.dtype), B, A).to(base_out.dtype)
    if g is None:
        return base_out + delta
    if not dropping:
        return layer.kind.scale_rows(base_out + delta, g).to(base_out.dtype)
    y = layer.kind.scale_rows(layer.base(x_d) + delta, g).to(base_out.dtype)
    return layer.base(x - x_d) + y
