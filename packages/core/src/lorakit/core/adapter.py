"""``Adapter``: a composition of primitives, applied to the layers of any model.

    adapter = Adapter(generator=MLP(32), normalizer=DeLoRA(), init=LDU(), rank=8)
    model = adapter.apply(model, targets=["q_proj", "v_proj"])

Primitives may be given as instances, registered names (``"mlp"``) or specs
(``{"name": "mlp", "args": {"width": 32}}``); ``Adapter.from_recipe("dora", rank=8)``
takes a registered recipe.
"""

from __future__ import annotations

import copy
import re
import warnings
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from . import experts, schema
from .layer import AdaptedLayer
from .lora import Direct, Kaiming, Scale
from .plugins import registry, type_name
from .primitives import AdapterError, Composition, Generator, Initializer, Magnitude, Normalizer
from .schema import AdapterField, adapter_field
from .trained import check_bias, check_module_names, trained_biases, wrap_saved
from .validation import MAX_SEED, check_int, check_probability, safe_regex

Targets = str | Iterable[str] | None


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLayer)}


class AdapterRecord(Mapping):
    """The adapter's description as its layers hold it: read-only, replaced as a whole.
    Copies of a model share it (nothing can change it); it pickles as its JSON."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data = copy.deepcopy(dict(data or {}))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __deepcopy__(self, memo: dict) -> AdapterRecord:
        return self

    def __reduce__(self):
        return (AdapterRecord, (self._data,))

    def __repr__(self) -> str:
        return f"AdapterRecord({self._data!r})"


def _record(model: nn.Module) -> Mapping[str, Any]:
    return next((layer.adapter_config for layer in adapted_layers(model).values()), AdapterRecord())


def adapter_config(model: nn.Module) -> dict:
    """The JSON description of ``model``'s adapter (``Adapter.config()`` + ``targets``, and
    ``extensions`` when an integration set one), ``{}`` without one: a fresh copy, whose
    changes change nothing. The record itself is immutable and lives on the adapted layers,
    not on the user's model object, so it is found through DDP/FSDP wrappers and goes with
    unload; it is replaced as a whole (:func:`set_extension`, ``freeze_generators``)."""
    return copy.deepcopy(dict(_record(model)))


def replace_adapter_config(model: nn.Module, **changes: Any) -> None:
    """Give every adapted layer of ``model`` a new record: the current one with ``changes``."""
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter")
    record = AdapterRecord({**_record(model), **changes})
    for layer in layers.values():
        layer.adapter_config = record


def set_extension(model: nn.Module, namespace: str, value: Any) -> None:
    """Keep an integration's own JSON state under ``extensions[namespace]`` of the adapter's
    record (``None`` removes it). Core carries it with the adapter and never interprets it;
    it is not a field of the adapter and checkpoints do not hold it."""
    if not (isinstance(namespace, str) and namespace):
        raise AdapterError(f"set_extension: namespace {namespace!r} must be a non-empty string (the integration)")
    extensions = {k: v for k, v in _record(model).get("extensions", {}).items() if k != namespace}
    if value is not None:
        extensions[namespace] = value
    replace_adapter_config(model, extensions=extensions)


def extension(model: nn.Module, namespace: str) -> Any:
    """What :func:`set_extension` keeps under ``namespace`` (a copy), None if nothing."""
    return copy.deepcopy(_record(model).get("extensions", {}).get(namespace))


def _check_targets(targets: Targets, field: str) -> str | list[str] | None:
    """``targets`` as JSON can hold it (a regex string or a list of names), checked."""
    if targets is None or isinstance(targets, str):
        if targets is not None:
            safe_regex(targets, f"{field} {targets!r:.80}", max_chars=None)
        return targets
    names = list(targets) if isinstance(targets, Iterable) else None
    if names is None or not all(isinstance(t, str) for t in names):
        raise AdapterError(f"{field}={targets!r:.80}: give module names (a list of strings) or a regex string")
    return names


def _matches(name: str, targets: Targets) -> bool:
    if isinstance(targets, str):  # a regex over the full module name; refused if it could hang
        return safe_regex(targets, f"targets {targets!r:.80}", max_chars=None).fullmatch(name) is not None
    return targets is not None and any(name == t or name.endswith("." + t) for t in targets)


ALL_LINEAR = "all-linear"
# classification heads PEFT's all-linear leaves out (peft.utils.constants.SEQ_CLS_HEAD_NAMES)
_CLASSIFIER_HEADS = ("score", "classifier")


def _output_heads(model: nn.Module) -> list[str]:
    """Names of the modules that produce the model's output: transformers' output
    embeddings (``lm_head``), else a top-level ``score``/``classifier`` head. They are
    trained as a whole (``modules_to_save``), never given a low-rank update by
    ``targets="all-linear"``."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    heads = [head] if isinstance(head, nn.Module) else [
        getattr(model, n) for n in _CLASSIFIER_HEADS if isinstance(getattr(model, n, None), nn.Module)]
    return [name for name, m in model.named_modules() if any(m is h for h in heads)]


def _all_linear(model: nn.Module) -> str:
    """PEFT's ``target_modules="all-linear"`` as a regex of full names: every
    ``nn.Linear`` (quantized linears subclass it) and every module whose layer kind
    declares ``all_linear`` (transformers' ``Conv1D``), except the output head and
    anything inside it."""
    heads = _output_heads(model)
    names = [name for name, m in model.named_modules()
             if name and (kind := registry.layer_kind(m)) is not None
             and (isinstance(m, nn.Linear) or getattr(kind, "all_linear", False))
             and not any(name == h or name.startswith(h + ".") for h in heads)]
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _layer_index(name: str) -> int | None:
    """The index of the repeated block a module is in: the first integer part of its
    name (``model.layers.3.self_attn.q_proj`` → 3; T5's encoder and decoder blocks
    share indices, as in PEFT's ``layers_to_transform``)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return None if match is None else int(match[1])


def default_targets(model: nn.Module) -> list[str]:
    """Targets registered for this model's family (``config.model_type`` or class)."""
    keys = [getattr(getattr(model, "config", None), "model_type", None), type(model).__name__]
    for key in keys:
        if key in registry.load().targets:
            return registry.targets[key]
    raise AdapterError(
        f"no default targets for {type(model).__name__}; pass targets=[...] "
        "(module names or a regex) or install an integration that registers them"
    )


def _target_hint(model: nn.Module, limit: int = 12) -> str:
    """What a user can pass instead: the adaptable module names (the last part of the
    full name, which a target matches), grouped by layer kind, and the registered
    defaults of the model family. The first modules of a model are usually containers
    (embeddings, encoder, ...) that no target can use, so listing those did not help."""
    by_kind: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if name and registry.layer_kind(module) is not None:
            names = by_kind.setdefault(type(module).__name__, {})
            short = name.rpartition(".")[2]
            names[short] = names.get(short, 0) + 1
    if by_kind:
        parts = []
        for kind, names in sorted(by_kind.items()):
            shown = ", ".join(list(names)[:limit]) + (", ..." if len(names) > limit else "")
            parts.append(f"{kind}: {shown} ({sum(names.values())} modules)")
        hint = "adaptable modules by layer kind: " + "; ".join(parts)
    else:
        hint = "it has no module of an adaptable layer kind (" + ", ".join(
            sorted(type_name(t) for t in registry.load().layers)) + ")"
    try:
        family = default_targets(model)
    except AdapterError:
        return hint + "; no registered default targets for this model family"
    return hint + f"; registered defaults for this model family (targets=None): {', '.join(family)}"


def _quantized_hint(name: str, module: nn.Module, dtype: torch.dtype) -> str:
    """Why a module with a non-float weight cannot be adapted, and what to install.

    A quantized linear usually subclasses ``nn.Linear``, so without its integration it
    falls back to the plain linear kind; the package that registers its kind is named."""
    cls = type(module)
    package = cls.__module__.partition(".")[0]
    supported = sorted(type_name(t) for t, k in registry.load().layers.items() if getattr(k, "quantized", False))
    own = sorted(type_name(t) for t, k in registry.layers.items()  # what lorakit-<package> adapts
                 if getattr(k, "quantized", False) and (getattr(k, "package", None) == package
                                                         or type(k).__module__.startswith(f"lorakit.{package}")))
    if own:
        return (f"module {name!r} is a {package} {cls.__name__} ({dtype} weight), which no installed layer kind "
                f"adapts; supported quantized layers: {', '.join(own)}. Narrow the targets or convert it.")
    install = f"pip install lorakit-{package}" if package in QUANTIZATION_PACKAGES else "register a layer kind"
    if package in QUANTIZATION_PACKAGES and (unloaded := _unloaded_plugin(package)):
        return f"module {name!r} is a {package} {cls.__name__} ({dtype} weight): {unloaded}"
    return (f"module {name!r} is a {cls.__name__} with a {dtype} weight (quantized); lorakit adapts it through "
            f"a layer kind: {install} (lorakit_layers hook), or dequantize the model first"
            + (f"; quantized layers supported now: {', '.join(supported)}" if supported else ""))


def _unloaded_plugin(package: str) -> str | None:
    """Why installed ``lorakit-<package>`` registered nothing (not loaded, or failed), or None."""
    import os
    from importlib.metadata import entry_points

    ep = next((ep for ep in entry_points(group="lorakit")
               if getattr(getattr(ep, "dist", None), "name", None) == f"lorakit-{package}"), None)
    if ep is None or ep.name in registry.plugins:
        return None
    if ep.name in registry.failures:
        return (f"lorakit-{package} is installed but its plugin {ep.name!r} failed to load "
                f"({registry.failures[ep.name]:.200}); see lorakit plugins")
    if os.environ.get("LORAKIT_DISABLE_AUTOLOAD", "") not in ("", "0"):
        why = "LORAKIT_DISABLE_AUTOLOAD is set; unset it, or registry.register_plugin(...) it"
    else:
        why = (f"LORAKIT_LOAD_PLUGINS={os.environ.get('LORAKIT_LOAD_PLUGINS', '')!r} leaves it out; add "
               f"{ep.name} to that list or unset it")
    return f"lorakit-{package} is installed but its plugin {ep.name!r} is not loaded ({why})"


def _is_tensor_subclass(t: torch.Tensor) -> bool:
    """A tensor whose operations a subclass dispatches (torchao's quantized weights): not a
    plain tensor or parameter, whose values a layer kind can read and write directly."""
    return type(t).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__


QUANTIZATION_PACKAGES = ("bitsandbytes",)
"""Quantization libraries with a lorakit integration (``lorakit-<name>``), named in errors."""


# -- the checks of the fields (each named by its ``field``, e.g. "adapter.rank") --------------
def _composition(kind: str) -> AdapterField:
    """A primitive field: an instance, a registered name or a spec; JSON is the spec, checked
    for shape only when read from a file (building it is the loader's step)."""
    def from_json(value: Any, field: str) -> Any:
        if value is None and kind == "magnitude":
            return None
        if not (isinstance(value, dict) and set(value) == {"name", "args"}
                and isinstance(value["name"], str) and isinstance(value["args"], dict)):
            raise AdapterError(f'{field} must be {{"name": str, "args": {{...}}}}, got {value!r:.80}')
        return value

    return AdapterField(check=lambda value, field: registry.create(kind, value),
                        to_json=lambda p: None if p is None else p.spec(), from_json=from_json)


def _rank(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(f"{field} must be an integer >= 1 (the rank), not {value!r:.40}")
    return value


def _rank_pattern(value: Any, field: str) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise AdapterError(f"{field}={value!r:.80}: give a dict of module pattern -> rank")
    for pattern, r in value.items():
        safe_regex(pattern, f"{field}[{pattern!r:.80}]")
        _rank(r, f"{field}[{pattern!r:.80}]")
    return dict(value)


_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _dtype(value: Any, field: str) -> torch.dtype | None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise AdapterError(f"{field}={value!r}: the adapter dtype must be a floating torch dtype "
                           "(torch.float32 is the default for fp16/bf16/fp32 models)")
    return value


def _dtype_from_json(value: Any, field: str) -> torch.dtype | None:
    if value is None:
        return None
    if value not in _DTYPES:
        raise AdapterError(f"{field}={value!r:.80}: give null or a torch dtype name ({', '.join(_DTYPES)})")
    return getattr(torch, value)


def _recipe(value: Any, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise AdapterError(f"{field} must be a string or null, not {value!r:.40}")
    return value


def _layers(value: Any, field: str) -> list[int] | None:
    """Stored as a sorted list: a range or a set round-trips through JSON."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, Iterable)):
        raise AdapterError(f"{field}={value!r:.40}: give block indices >= 0 (an int or a list)")
    return sorted({check_int(i, f"{field}[]", 0) for i in ([value] if isinstance(value, int) else value)})


def _layers_from_json(value: Any, field: str) -> list[int] | None:
    if value is not None and not isinstance(value, list):
        raise AdapterError(f"{field}={value!r:.40}: give block indices >= 0 (a list, or null)")
    return _layers(value, field)


@dataclass
class Adapter:
    """A composition of primitives and where and how it applies. Each field is declared once,
    with its check, JSON form and command-line flag (``lorakit.core.schema``)."""

    generator: Any = adapter_field(_composition("generator"), default_factory=Direct)  # LoRA's baseline
    normalizer: Any = adapter_field(_composition("normalizer"), default_factory=Scale)
    init: Any = adapter_field(_composition("initializer"), default_factory=Kaiming)
    magnitude: Any = adapter_field(_composition("magnitude"), default=None)
    rank: int = adapter_field(AdapterField(_rank, flag="--rank", type=int), default=8)
    rank_pattern: Mapping[str, int] = adapter_field(AdapterField(_rank_pattern), default_factory=dict)
    # save() writes it and load() must accept it: the range a torch.Generator seeds from
    seed: int = adapter_field(AdapterField(lambda v, f: check_int(v, f, 0, MAX_SEED), flag="--seed", type=int,
                                           help="seed of the adapter's initialization and of the run"), default=0)
    dtype: torch.dtype | None = adapter_field(AdapterField(
        _dtype, to_json=lambda d: None if d is None else str(d).removeprefix("torch."), from_json=_dtype_from_json),
        default=None)
    recipe: str | None = adapter_field(AdapterField(_recipe), default=None)
    # PEFT's lora_dropout: on the adapter branch's input, in training only
    dropout: float = adapter_field(AdapterField(check_probability, file_default=0.0, flag="--dropout", type=float,
                                                help="adapter dropout on the adapted layers' inputs (PEFT's "
                                                     "lora_dropout)"), default=0.0)
    # module names or a regex, removed from the targets
    exclude: Targets = adapter_field(AdapterField(_check_targets, file_default=None), default=None)
    # block indices to adapt (PEFT's layers_to_transform)
    layers: Iterable[int] | int | None = adapter_field(AdapterField(_layers, from_json=_layers_from_json,
                                                                    file_default=None), default=None)
    # train the base biases too: "none", "all" or "adapted" (PEFT's bias option)
    bias: str = adapter_field(AdapterField(check_bias, file_default="none"), default="none")
    # modules trained whole (heads, norms), as PEFT's option
    modules_to_save: Iterable[str] | None = adapter_field(AdapterField(check_module_names, file_default=None),
                                                          default=None)
    # every layer zero-padded to this rank: fixed shapes, so hot-swapped adapters never recompile
    max_rank: int | None = adapter_field(AdapterField(lambda v, f: v if v is None else _rank(v, f),
                                                      file_default=None), default=None)

    def __post_init__(self) -> None:
        schema.check_all(self)  # names, specs or instances -> instances; every field checked
        self.generator: Generator
        self.normalizer: Normalizer
        self.init: Initializer
        self.magnitude: Magnitude | None

    @property
    def composition(self) -> Composition:
        return Composition(self.generator, self.normalizer, self.init, self.magnitude)

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> Adapter:
        recipe = registry.recipe(name)
        return cls(**{**recipe.composition(), "recipe": name, **overrides})

    # -- description ----------------------------------------------------------------
    def config(self) -> dict:
        """JSON description: registered names + arguments only (no import paths)."""
        return schema.to_json(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Adapter:
        if not isinstance(config, Mapping):
            raise AdapterError(f"adapter config {config!r:.80}: give a dict like Adapter.config() returns")
        return cls(**schema.from_json(cls, dict(config)))

    def rank_for(self, name: str) -> int:
        for pattern, r in self.rank_pattern.items():
            if _matches(name, [pattern]) or _matches(name, pattern):
                return r
        return self.rank

    # -- apply -------------------------------------------------------------------------
    def apply(self, model: nn.Module, targets: Targets = None, *, target_parameters: str | Iterable[str] | None = None,
              train_only_adapter: bool = True, verbose: bool = False, restore: Mapping[str, bool] | None = None,
              freeze_base: bool | None = None) -> nn.Module:
        """Wrap every target module of ``model`` in place and return ``model``.

        ``targets``: module names (a name matches itself and any ``*.name``), a regex
        string over full names, ``"all-linear"`` (every linear layer but the output
        head, as PEFT), or None for the model family's registered defaults. The
        adapter's ``exclude`` and ``layers`` then narrow that set.
        All checks run before anything is replaced: on error the model is unchanged.

        ``target_parameters``: fused expert tensors to adapt in place (PEFT's option and
        matching rule: a name matches a parameter's full name or any ``*.name``), or
        ``"experts"`` for every fused expert tensor of the model; an ``(E, out, in)`` tensor
        gets E independent adapters (``lorakit.core.experts``), and a 2-D parameter of a module
        no layer kind adapts (an MoE router's ``gate.weight``) one adapter, the module's own
        forward running on the adapted weight. With it, ``targets=None`` adapts no module
        (as PEFT's ``target_modules=None``).

        ``train_only_adapter`` (default): every parameter of ``model`` is frozen except
        the adapter's, the biases ``bias=`` trains and the ``modules_to_save`` copies;
        False leaves the other parameters' ``requires_grad`` as they were.
        ``freeze_base`` is its former name.
        """
        if freeze_base is not None:
            warnings.warn("apply(freeze_base=...) is now apply(train_only_adapter=...)", DeprecationWarning,
                          stacklevel=2)
            train_only_adapter = freeze_base
        if adapted_layers(model):
            raise AdapterError(
                f"{type(model).__name__} already has a lorakit adapter; call "
                "lorakit.core.unload(model) (or merge_and_unload) before applying another"
            )
        explicit, asked = targets is not None and targets != ALL_LINEAR, targets
        if targets == ALL_LINEAR:
            targets = _all_linear(model)
        only_parameters = target_parameters is not None and (targets is None or targets == [])
        targets = default_targets(model) if targets is None and not only_parameters else targets
        chosen = {} if only_parameters else self._narrow(
            {n: m for n, m in model.named_modules() if n and _matches(n, targets)}, model)
        saved = self._saved_names(model)
        # a module trained whole needs no low-rank update inside it (a default "dense" in a head)
        chosen = {n: m for n, m in chosen.items() if not any(n == s or n.startswith(s + ".") for s in saved)}
        # fused expert tensors: built (every check) before anything is replaced
        wrappers = {} if target_parameters is None else experts.build_parameter_targets(
            model, target_parameters, registry, self._wrap, None if restore is None else dict(restore))
        # the regex all-linear expands to would read "'(?:)' match no module"
        if not chosen and not only_parameters and asked == ALL_LINEAR:
            raise AdapterError(f"targets='all-linear': {type(model).__name__} has no linear layer outside its output "
                               "head (nn.Linear, a quantized linear, Conv1D); name the modules to adapt instead; "
                               + _target_hint(model))
        if not chosen and not only_parameters:
            raise AdapterError(f"targets {targets!r} match no module of {type(model).__name__}; "
                               + _target_hint(model))
        if explicit and targets is not None and not isinstance(targets, str):  # defaults may list several versions
            unmatched = [t for t in targets if not any(_matches(n, [t]) for n in chosen)]
            if unmatched:
                raise AdapterError(f"targets {unmatched} match no module of {type(model).__name__} (the others "
                                   f"matched {len(chosen)} modules); fix or remove them; " + _target_hint(model))
        # restore (lorakit.core.load): module -> has residual buffers; no initializer runs
        new = {name: self._wrap(name, module, None if restore is None else restore.get(name, False))
               for name, module in chosen.items()}
        for name, layer in [*new.items(), *wrappers.items()]:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        targeted = sorted(new)
        new.update({f"{owner}.{sub}": layer for owner, wrapper in wrappers.items()
                    for sub, layer in adapted_layers(wrapper).items()})
        if train_only_adapter:
            for p in model.parameters():
                p.requires_grad_(False)
            for layer in new.values():
                for p in layer.slots.parameters():
                    p.requires_grad_(True)
        record = AdapterRecord({**self.config(), "targets": targeted,
                                **({"target_parameters": sorted(experts.split_layer_names(new)[1])}
                                   if wrappers else {})})
        for layer in new.values():
            layer.adapter_config = record  # one immutable record, shared: see adapter_config(model)
        for p in trained_biases(model).values():
            p.requires_grad_(True)
        for module in wrap_saved(model, saved, _matches).values():
            module.trained.requires_grad_(True)
        if verbose:
            print(f"lorakit: adapted {len(new)} modules of {type(model).__name__}: {', '.join(sorted(new))}")
        return model

    def _narrow(self, chosen: dict[str, nn.Module], model: nn.Module) -> dict[str, nn.Module]:
        """``chosen`` without the modules ``exclude`` names and outside ``layers``."""
        if self.exclude is not None:
            if not isinstance(self.exclude, str):  # a name that matches nothing is a typo, not a no-op
                unknown = [e for e in self.exclude if not any(_matches(n, [e]) for n, _ in model.named_modules())]
                if unknown:
                    raise AdapterError(f"exclude={unknown} match no module of {type(model).__name__}; "
                                       + _target_hint(model))
            chosen = {n: m for n, m in chosen.items() if not _matches(n, self.exclude)}
        if self.layers is not None:
            wanted = set(cast(list, self.layers))  # __post_init__ made it a sorted list
            chosen = {n: m for n, m in chosen.items() if _layer_index(n) in wanted}
        return chosen

    def _saved_names(self, model: nn.Module) -> list[str]:
        """Full names of the modules to save; a name matching nothing is an error."""
        if not self.modules_to_save:
            return []
        names = [n for n, _ in model.named_modules() if n and _matches(n, self.modules_to_save)]
        unknown = [s for s in self.modules_to_save if not any(_matches(n, [s]) for n in names)]
        if unknown:
            raise AdapterError(f"modules_to_save={unknown} match no module of {type(model).__name__}")
        return names

    def _wrap(self, name: str, module: nn.Module, restore_residual: bool | None = None) -> AdaptedLayer:
        kind = registry.layer_kind(module)
        if kind is None and (fused := experts.owner_kind(registry, module)) is not None:
            raise AdapterError(f"module {name!r}: {fused.check(module)}")  # fused experts: target_parameters
        if kind is None:
            types = ", ".join(sorted(type_name(t) for t in registry.layers))
            raise AdapterError(
                f"module {name!r} is a {type(module).__name__}; lorakit adapts {types}. "
                "Narrow the targets or register a layer kind for it (lorakit_layers hook)."
            )
        if (reason := kind.check(module)) is not None:
            raise AdapterError(f"module {name!r}: {reason}")
        weight = kind.matrix(module)
        # a checkpoint load (restore) builds on meta: the checkpoint has every value, which a
        # second load copies once the model is materialized (FSDP2's to_empty flow)
        if weight.is_meta and restore_residual is None:
            raise AdapterError(f"module {name!r} has its weight on the meta device; materialize the base "
                               "weights first (model.to_empty(device=...) and load them), then apply; or "
                               "lorakit.core.load a checkpoint into it, which builds the adapter on meta")
        if not weight.dtype.is_floating_point:
            raise AdapterError(_quantized_hint(name, module, weight.dtype))
        if not kind.quantized and _is_tensor_subclass(weight):  # e.g. torchao's Int8Tensor in an nn.Linear
            raise AdapterError(f"module {name!r} holds its weight as a {type(weight).__name__} (a tensor subclass, "
                               "e.g. torchao's quantized weights), which its layer kind cannot read or merge; "
                               "dequantize the model first, or register a layer kind for it (lorakit_layers hook)")
        out_f, in_f = weight.shape
        device = weight.device
        del weight  # a quantized kind's matrix is a transient dequantized copy: keep none
        kind.prepare(module)
        rank = self.rank_for(name)
        if rank > min(out_f, in_f):
            raise AdapterError(
                f"module {name!r} ({out_f}x{in_f}): rank {rank} exceeds min(out, in) = "
                f"{min(out_f, in_f)}; lower the rank or set rank_pattern for it"
            )
        # modulo 2**64, the range manual_seed takes (a no-op for seeds below ~1.8e13)
        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**64)
        try:
            layer = AdaptedLayer(module, kind, rank, self.composition, rng, dtype=self.dtype, dropout=self.dropout,
                                 restore_residual=restore_residual)
        except AdapterError as exc:
            raise AdapterError(f"module {name!r}: {exc}") from None
        if self.max_rank is not None:  # lorakit.core.hotswap: the same function at fixed shapes
            from .hotswap import pad_layer

            pad_layer(layer, self.max_rank, name)
        return _to_device(layer, device)


def _to_device(layer: AdaptedLayer, device: torch.device) -> AdaptedLayer:
    """Move what the adapted layer built to ``device``, leaving its base (already there) alone:
    ``Module.to`` swaps a tensor-subclass weight (torchao's ``NF4Tensor``) for a copy, which
    fails while an autograd graph of an earlier forward still holds it."""
    inside = {id(m) for m in layer.base.modules()}
    for module in layer.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(device), recurse=False)
    return layer
