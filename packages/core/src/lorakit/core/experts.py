"""Parameter targets: fused expert tensors ``(E, out, in)`` adapted as E independent matrices.

A mixture-of-experts module keeps its experts as 3-D parameters, not ``nn.Linear``
modules. A fused tensor is E independent linear maps, so it gets E independent
adapters, each an ordinary :class:`~lorakit.core.layer.AdaptedLayer` over a view of one
expert's matrix (:class:`ExpertMatrix`, layer kind :class:`ExpertKind`):

    W̄_e = W[e]            (E, out, in) storage, or W[e]ᵀ for an (E, in, out) one
    y_e  = g_e ⊙ (W̄_e x + B'_e (A'_e x)) + b_e     on the tokens routed to expert e only

Every registered composition works unchanged because each expert *is* a single-matrix
adapter: the initializer sees that expert's own matrix (PiSSA's SVD, LDU's LU per
expert), DoRA keeps one magnitude row per expert output, ``merge`` writes ``W_eff`` into
the slice ``W[e]`` and ``unmerge`` restores it. The module holding the tensors is replaced
by :class:`AdaptedParameters`, which keeps the base module (its tensors untouched) and
runs the family's forward (:meth:`FusedExpertsKind.forward`, one implementation per
layout, e.g. ``lorakit.transformers.moe``): the adapter term of expert e is computed on
the tokens the router sends to e, grouped like the base's own loop, never as an
``E × out × in`` delta.

How a module type lays out its tensors is a :class:`FusedExpertsKind`, registered like
any layer kind through the ``lorakit_layers`` hook (``register(ExpertsClass, kind)``), or
under a stand-in type with :meth:`FusedExpertsKind.accepts` recognising the modules (for
classes that share a declared layout but no base class); core knows no family.

A 2-D parameter of a module no layer kind adapts (a router's ``weight``) is one matrix
(E = 1, :class:`ParameterKind`): the module's own forward runs on ``W_eff``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .layer_kinds import LayerKind
from .primitives import AdapterError

#: the child of :class:`AdaptedParameters` holding the per-expert layers: a layer's name is
#: ``<module>.param_adapters.<parameter>.<expert>``
CONTAINER = "param_adapters"
LAYER_NAME = re.compile(rf"^(?P<module>.+)\.{CONTAINER}\.(?P<param>[^.]+)\.(?P<expert>\d+)$")


@dataclass(frozen=True)
class ExpertLayout:
    """How one fused parameter is used: ``transposed`` False for ``(E, out, in)`` storage
    (``F.linear(x, W[e])``), True for ``(E, in, out)`` (``x @ W[e]``, gpt-oss)."""

    transposed: bool = False


class FusedExpertsKind(LayerKind):
    """The layer kind of a module holding fused expert tensors (registered per module type).

    Subclasses implement :meth:`layout` (which parameters, which axis is ``out``; an
    unknown one is refused) and :meth:`forward` (the module's forward with the adapters,
    computing expert e's adapter term on the tokens routed to e only)."""

    exports = frozenset()

    def check(self, base: nn.Module) -> str | None:
        return (f"a {type(base).__name__} holds fused expert tensors, not one matrix; adapt them with "
                "target_parameters=[...] (e.g. ['gate_up_proj', 'down_proj'] or 'experts')")

    def accepts(self, module: nn.Module) -> bool:
        """For a kind registered under a stand-in type: whether it handles ``module``, a type it
        was not registered for (by the attributes that declare a layout)."""
        return False

    def parameter_names(self, module: nn.Module) -> list[str]:
        """The fused tensors of ``module`` this kind adapts (``target_parameters="experts"``)."""
        raise NotImplementedError

    def layout(self, module: nn.Module, param: str) -> ExpertLayout:
        """How ``param`` is used; an :class:`AdapterError` (the reason) for one it does not know."""
        raise NotImplementedError

    def forward(self, wrapper: AdaptedParameters, *args, **kwargs) -> Tensor:
        raise NotImplementedError


class ExpertMatrix(nn.Module):
    """Expert ``index`` of the fused parameter ``param`` of ``owner`` as a matrix module: the
    base of one expert's :class:`AdaptedLayer`. It holds no tensor (``owner`` is not a
    submodule: the fused tensor stays where it is, saved once); ``forward`` is the base's
    own product for that expert, so an adapter with a zero update computes it bit for bit."""

    def __init__(self, owner: nn.Module, param: str, index: int | None, layout: ExpertLayout):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # a reference, not a child module
        self.param, self.index, self.layout = param, index, layout  # index None: a 2-D parameter, whole

    @property
    def fused(self) -> Tensor:
        return getattr(self.owner, self.param)

    def _matrix(self, W: Tensor) -> Tensor:
        W = W if self.index is None else W[self.index]
        return W.T if self.layout.transposed else W

    @property
    def weight(self) -> Tensor:
        """``W̄_e`` (out × in), a view of the fused tensor's data."""
        return self._matrix(self.fused.detach())

    bias = None

    def forward(self, x: Tensor) -> Tensor:
        W = self.fused if self.index is None else self.fused[self.index]
        return x @ W if self.layout.transposed else F.linear(x, W)

    def extra_repr(self) -> str:
        where = "" if self.index is None else f"[{self.index}]"
        return f"{self.param}{where}, shape={tuple(self.weight.shape)}"


class ExpertKind(LayerKind):
    """One expert of a fused tensor as ``W̄ = W[e]`` (or ``W[e]ᵀ``); merge writes the slice."""

    def matrix(self, base):
        return base.weight

    def frozen_tensors(self, base):
        return (base.fused,)  # the fused tensor itself: a stable identity for the eval cache

    def set_matrix(self, base, W):
        base.weight.copy_(W)  # a view of the fused tensor's data: writes expert e in place

    def linear(self, base, x):
        return base(x)

    def lowrank(self, base, x, B, A):
        return F.linear(F.linear(x, A), B)


EXPERT_KIND = ExpertKind()


class AdaptedParameters(nn.Module):
    """Replaces a module whose fused parameters are adapted: ``base`` (the module, unchanged)
    and ``param_adapters[param][e]``, one :class:`AdaptedLayer` per expert. The forward is the
    module kind's; merged or disabled layers count as unadapted there."""

    def __init__(self, base: nn.Module, kind: FusedExpertsKind, layers: dict[str, list[nn.Module]]):
        super().__init__()
        self.base = base
        self.kind = kind
        setattr(self, CONTAINER, nn.ModuleDict({p: nn.ModuleList(ls) for p, ls in layers.items()}))

    def layers(self, param: str) -> nn.ModuleList | None:
        return getattr(self, CONTAINER)[param] if param in getattr(self, CONTAINER) else None

    def active(self, param: str, index: int):
        """The adapted layer of expert ``index`` of ``param`` if it adds its update now, else None."""
        layers = self.layers(param)
        if layers is None:
            return None
        layer = layers[index]
        return None if (layer.merged or layer.disabled) else layer

    def forward(self, *args, **kwargs):
        if not any(self.active(p, 0) is not None for p in getattr(self, CONTAINER)):
            return self.base(*args, **kwargs)
        return self.kind.forward(self, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # model code reading the experts' attributes (num_experts, ...)
            return getattr(super().__getattr__("base"), name)


class ParameterKind(FusedExpertsKind):
    """A 2-D parameter of a module no layer kind adapts (transformers 5's MoE routers hold their
    ``weight`` so), as one matrix ``W̄ = W`` (out × in, as ``F.linear`` uses it). How the module
    uses it is its own business, so its forward runs unchanged on the adapted weight,

        W_eff = diag(g) (W̄ + B A)     (g = 1 without a magnitude head)

    passed by ``torch.func.functional_call``: one out × in tensor per forward, as PEFT's
    ``ParamWrapper``, and no dropout (which acts on a layer's input, not on a weight)."""

    def accepts(self, module):
        return False  # chosen by resolve_parameters, never by module type

    def parameter_names(self, module):
        return []  # never part of target_parameters="experts"

    def layout(self, module, param):
        shape = tuple(getattr(module, param).shape)
        if len(shape) != 2:
            raise AdapterError(f"a {len(shape)}-D parameter of a {type(module).__name__}, which no registered "
                               "FusedExpertsKind lays out; register one for this module type")
        return ExpertLayout(transposed=False)

    def forward(self, wrapper: AdaptedParameters, *args, **kwargs) -> Tensor:
        import torch

        from .functional import autocast_off

        weights = {}
        for param in getattr(wrapper, CONTAINER):
            layer = wrapper.active(param, 0)
            if layer is not None:
                B, A, g = layer.factors()
                W = layer.kind.matrix(layer.base)
                with autocast_off(W.device.type):
                    V = W.to(A.dtype) + B @ A
                weights[param] = (V if g is None else V * g[:, None]).to(W.dtype)
        return torch.func.functional_call(wrapper.base, weights, args, kwargs)


PARAMETER_KIND = ParameterKind()


def matching_parameters(model: nn.Module, targets: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Full parameter name -> (owning module name, parameter name), PEFT's rule: a target
    matches a parameter's full name or any ``*.name`` suffix of it (recurse=False per module)."""
    targets = list(targets)
    found = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if any(full == t or full.endswith("." + t) for t in targets):
                found[full] = (module_name, pname)
    return found


def layer_name(module: str, param: str, index: int) -> str:
    return f"{module}.{CONTAINER}.{param}.{index}"


def split_layer_names(names: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Adapted-layer names as ``(module targets, {full parameter name: experts})``."""
    modules: list[str] = []
    params: dict[str, int] = {}
    for name in names:
        match = LAYER_NAME.match(name)
        if match is None:
            modules.append(name)
        else:
            full = f"{match['module']}.{match['param']}"
            params[full] = max(params.get(full, 0), int(match["expert"]) + 1)
    return modules, params


def adapted_parameter_modules(model: nn.Module) -> dict[str, AdaptedParameters]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedParameters)}


def unwrap_parameters(model: nn.Module) -> None:
    """Put every module whose parameters were adapted back in place of its wrapper."""
    for name, wrapper in adapted_parameter_modules(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper.base)


EXPERTS_PRESET = "experts"
"""``target_parameters="experts"``: every fused expert tensor of the model (each module
whose layer kind is a :class:`FusedExpertsKind`, the parameters its :meth:`layout` takes)."""


def owner_kind(registry, module: nn.Module) -> FusedExpertsKind | None:
    """The module type's registered kind, else a registered fused kind that :meth:`accepts` it."""
    kind = registry.layer_kind(module)
    if kind is not None:
        return kind if isinstance(kind, FusedExpertsKind) else None
    return next((k for k in registry.layers.values() if isinstance(k, FusedExpertsKind) and k.accepts(module)),
                None)


def resolve_parameters(model: nn.Module, targets: str | Iterable[str], registry) -> dict[str, tuple[str, str]]:
    """The parameters ``target_parameters`` names (full name -> (module, parameter)); a name
    matching nothing, a non-fused or an unknown layout is one :class:`AdapterError`."""
    if targets == EXPERTS_PRESET:
        found = {}
        for module_name, module in model.named_modules():
            if (kind := owner_kind(registry, module)) is not None:
                found.update({f"{module_name}.{p}": (module_name, p) for p in kind.parameter_names(module)})
        if not found:
            raise AdapterError(f"target_parameters='experts': {type(model).__name__} has no fused expert tensors "
                               "of a registered layout (lorakit_layers hook)")
        return found
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"target_parameters={targets!r:.80}: give parameter names (a list of strings, as PEFT's "
                           "target_parameters) or 'experts'")
    targets = list(targets)
    found = matching_parameters(model, targets)
    unmatched = [t for t in targets if not any(full == t or full.endswith("." + t) for full in found)]
    if unmatched:
        names = sorted({full.rpartition(".")[2] for m in model.modules() if owner_kind(registry, m)
                        for full, _ in m.named_parameters(recurse=False)})
        raise AdapterError(f"target_parameters {unmatched} match no parameter of {type(model).__name__}; fused "
                           f"expert tensors here: {names or 'none'}")
    for full, (module_name, pname) in found.items():
        module = model.get_submodule(module_name)
        shape = tuple(getattr(module, pname).shape)
        if parameter_kind(registry, module, pname) is None:
            raise AdapterError(f"parameter {full!r} {shape} of a {type(module).__name__}: lorakit adapts fused 3-D "
                               "expert tensors of a registered layout, and 2-D parameters of modules no layer kind "
                               "adapts, here; adapt this one through its module (targets=[...]), or register a "
                               "FusedExpertsKind for this module type")
    return found


def parameter_kind(registry, module: nn.Module, param: str) -> FusedExpertsKind | None:
    """The kind adapting ``module.param``: the module's fused kind for a 3-D tensor (or any
    tensor of such a module: its layout decides), :data:`PARAMETER_KIND` for a 2-D parameter
    of a module no layer kind adapts (an ``nn.Linear``'s weight is adapted through its module)."""
    if (kind := owner_kind(registry, module)) is not None:
        return kind
    if getattr(module, param).dim() == 2 and registry.layer_kind(module) is None:
        return PARAMETER_KIND
    return None


def expert_count(param: Tensor) -> int:
    """How many independent matrices ``param`` holds: E of an (E, ·, ·) tensor, 1 for a 2-D one."""
    return param.shape[0] if param.dim() == 3 else 1


def build_parameter_targets(model: nn.Module, targets: str | Iterable[str], registry, wrap,
                            restore: dict[str, bool] | None = None) -> dict[str, AdaptedParameters]:
    """Module name -> its :class:`AdaptedParameters` (built, not yet in place): for each fused
    parameter, one layer per expert made by ``wrap(layer_name, ExpertMatrix, restore_residual)``
    (``Adapter._wrap``: its checks, seed and rank pattern by that name)."""
    by_module: dict[str, list[str]] = {}
    for module_name, pname in resolve_parameters(model, targets, registry).values():
        by_module.setdefault(module_name, []).append(pname)
    saved = split_layer_names(restore or {})[1]
    built = {}
    for module_name, pnames in by_module.items():
        module = model.get_submodule(module_name)
        kind = parameter_kind(registry, module, pnames[0])
        assert kind is not None  # resolve_parameters checked
        order = [p for p, _ in module.named_parameters(recurse=False) if p in pnames]  # declaration order
        layers = {}
        for pname in order:
            full, fused = f"{module_name}.{pname}", getattr(module, pname)
            try:
                layout = kind.layout(module, pname)
            except AdapterError as exc:
                raise AdapterError(f"parameter {full!r} {tuple(fused.shape)}: {exc}") from None
            experts = expert_count(fused)
            if restore is not None and saved.get(full, experts) != experts:
                raise AdapterError(f"parameter {full!r}: the checkpoint has {saved[full]} experts, the model "
                                   f"{experts}; load it into the model it was trained on")
            index = (lambda e: e) if fused.dim() == 3 else (lambda e: None)
            layers[pname] = [wrap(layer_name(module_name, pname, e), ExpertMatrix(module, pname, index(e), layout),
                                  None if restore is None else restore.get(layer_name(module_name, pname, e), False))
                             for e in range(experts)]
            if kind is PARAMETER_KIND and layers[pname][0].dropout > 0:
                raise AdapterError(f"parameter {full!r}: dropout={layers[pname][0].dropout} acts on a layer's input; "
                                   "a 2-D parameter target is adapted as a weight (as PEFT's target_parameters, "
                                   "which refuses lora_dropout): use dropout=0")
        built[module_name] = AdaptedParameters(module, kind, layers)
    return built
