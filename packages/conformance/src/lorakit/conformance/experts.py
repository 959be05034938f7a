"""The kit's fused-expert case: a tiny mixture-of-experts module and its layer kind.

:class:`TinyExperts` keeps E experts as two fused 3-D parameters, as transformers' MoE
modules do, one in each layout ``lorakit.core.experts`` supports:

    up   (E, hidden, in)    used as F.linear(x, up[e])    (E, out, in) storage
    down (E, hidden, out)   used as h @ down[e]            (E, in, out) storage, transposed
    y_t  = Σ_{e ∈ route(t)} w_te · down[e]ᵀ tanh(up[e] x_t)

Token t goes to experts ``t mod E`` and ``(t + 1) mod E`` (a fixed route, so every expert
gets tokens in any batch of ≥ E tokens and each one's gradient is checked), weighted by a
softmax of a frozen gate's scores. :class:`TinyExpertsKind` is a plugin's
:class:`~lorakit.core.experts.FusedExpertsKind` for it, registered by :func:`ensure_registered`
(the first experts case builds it): each adapted expert's product is its own
:class:`~lorakit.core.layer.AdaptedLayer`, applied to that expert's tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core import hookimpl
from lorakit.core.experts import AdaptedParameters, ExpertLayout, FusedExpertsKind
from lorakit.core.plugins import registry
from lorakit.core.primitives import AdapterError

EXPERTS = 3
TOKENS = 3  # per batch element: a batch of one still reaches every expert
PLUGIN = "lorakit.conformance.experts"


class TinyExperts(nn.Module):
    def __init__(self, in_f: int, hidden: int, out_f: int, experts: int = EXPERTS):
        super().__init__()
        self.num_experts = experts
        self.gate = nn.Linear(in_f, experts, bias=False)
        self.up = nn.Parameter(torch.empty(experts, hidden, in_f))
        self.down = nn.Parameter(torch.empty(experts, hidden, out_f))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(experts (T, 2), weights (T, 2))`` of the tokens ``x (T, in)``."""
        t = torch.arange(x.shape[0], device=x.device)
        index = torch.stack([t % self.num_experts, (t + 1) % self.num_experts], dim=1)
        return index, self.gate(x).softmax(dim=-1).gather(1, index)

    def forward(self, x: Tensor) -> Tensor:
        return experts_forward(self, x, lambda param, e, h: _product(self, param, e, h))


def _product(module: nn.Module, param: str, e: int, h: Tensor) -> Tensor:
    W = getattr(module, param)[e]
    return F.linear(h, W) if param == "up" else h @ W


def experts_forward(module: TinyExperts, x: Tensor, product) -> Tensor:
    """The module's forward with ``product(param, e, h)`` for each expert's matrices."""
    tokens = x.reshape(-1, x.shape[-1])
    index, weights = module.route(tokens)
    out = None
    for e in range(module.num_experts):
        token, pos = torch.where(index == e)
        if not len(token):
            continue
        y = product("down", e, torch.tanh(product("up", e, tokens[token]))) * weights[token, pos, None]
        out = torch.zeros((tokens.shape[0], y.shape[-1]), dtype=y.dtype, device=y.device) if out is None else out
        out = out.index_add(0, token, y)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class TinyExpertsKind(FusedExpertsKind):
    LAYOUTS = {"up": ExpertLayout(transposed=False), "down": ExpertLayout(transposed=True)}

    def parameter_names(self, module):
        return list(self.LAYOUTS)

    def layout(self, module, param):
        if param not in self.LAYOUTS:
            raise AdapterError(f"TinyExperts has no expert tensor {param!r}; its are {list(self.LAYOUTS)}")
        return self.LAYOUTS[param]

    def forward(self, wrapper: AdaptedParameters, x: Tensor) -> Tensor:
        def product(param, e, h):
            layer = wrapper.active(param, e)
            return _product(wrapper.base, param, e, h) if layer is None else layer(h)
        return experts_forward(wrapper.base, x, product)


@hookimpl
def lorakit_layers(register):
    register(TinyExperts, TinyExpertsKind())


def ensure_registered() -> None:
    """Register the kit's experts kind once (a plugin of its own, removable by name)."""
    import sys

    if PLUGIN not in registry.load().plugins:
        registry.register_plugin(sys.modules[__name__], PLUGIN)
