"""Plugin manager and registry (docs/design.md, "Registry and checkpoints"; docs/plugins.md).

Plugins are found through the entry-point group ``lorakit``; built-ins are plugins
like any other. Loading is lazy (first lookup) and idempotent. Environment:

- ``LORAKIT_DISABLE_AUTOLOAD=1``: load no entry points (register plugins by hand
  with :func:`register_plugin`);
- ``LORAKIT_LOAD_PLUGINS=core,generators``: allow-list of entry-point names.

A plugin that fails to import (``sys.exit`` included), raises in a hook, registers a
name that is already taken (or one of the CLI's own commands), or has a command whose
``configure`` raises is recorded in :data:`registry.failures` with the reason and
registers nothing: registration is all-or-nothing. The others load. A recipe naming a
primitive that no loaded plugin registers is withdrawn and listed as failed too.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .primitives import COMPOSITION_KINDS, KINDS, AdapterError, Primitive

HOOKS = tuple(name for name in vars(hookspecs) if name.startswith("lorakit_"))
#: the ``lorakit`` CLI's own subcommands, which no plugin may take
CORE_COMMANDS = frozenset({"recipes", "plugins", "recover", "demo"})


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    #: (table, key) of each registered entry, so the plugin can be unregistered
    entries: list[tuple[dict, Any]] = field(default_factory=list, repr=False, compare=False)


@dataclass
class Recipe:
    name: str
    generator: dict
    normalizer: dict
    init: dict
    magnitude: dict | None = None
    description: str = ""
    plugin: str = ""

    def composition(self) -> dict:
        return {k: getattr(self, k) for k in ("generator", "normalizer", "init", "magnitude")}


def as_spec(value: Any) -> dict | None:
    """``"mlp"`` or ``{"name": "mlp", "args": {...}}`` or a primitive → a spec dict."""
    if value is None:
        return None
    if isinstance(value, Primitive):
        return value.spec()
    if isinstance(value, str):
        return {"name": value, "args": {}}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        args = value.get("args", {})
        if not isinstance(args, dict):
            raise AdapterError(f"primitive spec {value!r}: 'args' must be an object")
        return {"name": value["name"], "args": dict(args)}
    raise AdapterError(f"cannot read a primitive from {value!r}; give a name or a primitive")


def format_spec(spec: Any) -> str:
    """A primitive spec (anything :func:`as_spec` reads) as text: ``name`` or
    ``name:key=value,...`` — the form ``lorakit finetune --generator`` & co. accept.
    The one formatter for specs: CLI listings, conformance ids, run labels."""
    spec = as_spec(spec)
    args = ",".join(f"{k}={v}" for k, v in spec["args"].items())
    return spec["name"] + (f":{args}" if args else "")


class Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("lorakit")
        self.pm.add_hookspecs(hookspecs)
        self.loaded = False
        self.primitives: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
        self.recipes: dict[str, Recipe] = {}
        self.layers: dict[type | str, Any] = {}  # a type, or its qualified name (a LazyKind)
        self.targets: dict[str, list[str]] = {}
        self.exporters: dict[str, Callable] = {}
        self.commands: dict[str, tuple] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: dict[str, str] = {}
        # entries of the plugin being registered, committed only if all of it succeeds
        self._pending: list[tuple[dict, Any, Any, str]] = []
        self._loading = False  # recipes are checked once every entry point is in
        self._partial = False  # an allow-list left plugins out: their recipes go quietly

    # -- loading ---------------------------------------------------------------
    def load(self) -> Registry:
        if self.loaded:
            return self
        self.loaded = True
        if os.environ.get("LORAKIT_DISABLE_AUTOLOAD", "") not in ("", "0"):
            self._partial = True
            return self
        allow = os.environ.get("LORAKIT_LOAD_PLUGINS")
        allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
        self._partial, self._loading = allowed is not None, True
        try:
            self._load_entry_points(allowed)
        finally:
            self._loading = False
        self._check_recipes()
        return self

    def _load_entry_points(self, allowed: set[str] | None) -> None:
        for ep in sorted(entry_points(group="lorakit"), key=lambda e: (e.name != "core", e.name)):
            if allowed is not None and ep.name not in allowed or ep.name in self.plugins:
                continue
            dist = getattr(ep, "dist", None)
            try:
                module = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit too: a broken plugin must not break the others
                self._fail(ep.name, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self.register_plugin(module, ep.name, dist.name if dist else None, dist.version if dist else None)

    def register_plugin(self, module: Any, name: str | None = None,
                        distribution: str | None = None, version: str | None = None) -> None:
        """Register a plugin object (module or class with ``@hookimpl`` functions)."""
        name = str(name or getattr(module, "__name__", repr(module)))
        try:
            self.pm.register(module, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            self._fail(name, f"rejected: {exc}")
            return
        info = PluginInfo(name, distribution, version)
        self._pending = []
        # Each hook is called through pluggy, restricted to this plugin: a registration
        # belongs to the plugin that made it (``unregister`` removes exactly that), and
        # a plugin whose hook fails registers nothing while the others stay loaded.
        implemented = {caller.name for caller in self.pm.get_hookcallers(module) or ()}
        others = [p for p in self.pm.get_plugins() if p is not module]
        try:  # every hook into _pending; a failure anywhere discards all of it
            for hook in HOOKS:
                if hook in implemented:
                    info.hooks.append(hook)
                    self._run_hook(info, hook, self.pm.subset_hook_caller(hook, remove_plugins=others))
        except _PluginFailed as exc:
            self.pm.unregister(module)
            self._fail(name, str(exc))
            return
        finally:
            pending, self._pending = self._pending, []
        for table, key, value, label in pending:
            table[key] = value
            info.registered.append(label)
            info.entries.append((table, key))
        self.plugins[name] = info
        if self.loaded and not self._loading:  # load() checks them once every plugin is in
            self._check_recipes()

    def unregister(self, name: str) -> PluginInfo:
        """Remove a plugin and everything it registered (its failure record too)."""
        self.failures.pop(name, None)
        if name not in self.plugins:
            raise AdapterError(f"no plugin {name!r} is registered; registered: {', '.join(sorted(self.plugins))}")
        info = self.plugins.pop(name)
        for table, key in info.entries:
            table.pop(key, None)
        if (plugin := self.pm.get_plugin(name)) is not None:
            self.pm.unregister(plugin)
        return info

    def _fail(self, name: str, reason: str, warn: bool = True) -> None:
        self.failures[name] = reason
        if warn:
            what = name if name.startswith("recipe ") else f"plugin {name!r}"
            warnings.warn(f"lorakit {what}: {reason}", stacklevel=3)

    def _run_hook(self, info: PluginInfo, hook: str, call: Callable) -> None:
        register = getattr(self, "_register_" + hook.removeprefix("lorakit_"))
        try:
            call(register=lambda *a, **k: register(info, *a, **k))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # sys.exit() in a hook included
            raise _PluginFailed(f"{hook} raised {type(exc).__name__}: {exc}") from None

    def _check_recipes(self) -> None:
        """Withdraw each recipe that names a primitive no loaded plugin registers, and
        list it as failed: ``lorakit demo`` and lookups then see only usable recipes."""
        for name, recipe in list(self.recipes.items()):
            specs = {kind: getattr(recipe, field_name) for field_name, kind in COMPOSITION_KINDS.items()}
            missing = [f"{kind} {spec['name']!r}" for kind, spec in specs.items()
                       if spec is not None and spec["name"] not in self.primitives[kind]]
            if missing:
                del self.recipes[name]
                if (info := self.plugins.get(recipe.plugin)) is not None:
                    info.registered.remove(f"recipe {name!r}")
                self._fail(f"recipe {name!r}", f"from plugin {recipe.plugin!r} names {', '.join(missing)}, "
                                               "which no loaded plugin registers; install it or fix the recipe",
                           warn=not self._partial)

    # -- register callbacks ------------------------------------------------------
    def _claim(self, table: dict, key: Any, value: Any, label: str, info: PluginInfo) -> None:
        if key in table or any(t is table and k == key for t, k, _, _ in self._pending):
            raise AdapterError(f"{label} is already registered; rename it in plugin {info.name!r}")
        self._pending.append((table, key, value, label))

    def _register_primitives(self, info: PluginInfo, cls: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Primitive) and cls.kind in KINDS and cls.name):
            raise AdapterError(f"{cls!r} is not a primitive class with a kind and a name")
        self._claim(self.primitives[cls.kind], cls.name, cls, f"{cls.kind} {cls.name!r}", info)

    def _register_recipes(self, info: PluginInfo, name: str, *, generator, normalizer, init,
                          magnitude=None, description: str = "") -> None:
        g, n, i = as_spec(generator), as_spec(normalizer), as_spec(init)
        if g is None or n is None or i is None:
            raise AdapterError(f"recipe {name!r} needs a generator, a normalizer and an init")
        recipe = Recipe(name, g, n, i, as_spec(magnitude), description, info.name)
        self._claim(self.recipes, name, recipe, f"recipe {name!r}", info)

    def _register_layers(self, info: PluginInfo, module_type: type | str, kind: Any) -> None:
        # a type, or its qualified name "pkg.module.Type" (a plugin that must not import its library)
        self._claim(self.layers, module_type, kind, f"layer {type_name(module_type)}", info)

    def _register_targets(self, info: PluginInfo, model_type: str, names: list[str]) -> None:
        self._claim(self.targets, model_type, list(names), f"targets {model_type!r}", info)

    def _register_exporters(self, info: PluginInfo, name: str, function: Callable) -> None:
        self._claim(self.exporters, name, function, f"exporter {name!r}", info)

    def _register_commands(self, info: PluginInfo, name: str, help: str,
                           configure: Callable, run: Callable) -> None:
        if name in CORE_COMMANDS:
            raise AdapterError(f"command {name!r} is one of lorakit's own; rename it in plugin {info.name!r}")
        if not (isinstance(name, str) and name and callable(configure) and callable(run)):
            raise AdapterError(f"command {name!r}: give a name, a help text and callables configure(parser), "
                               "run(args)")
        # configure() runs when the CLI builds its parser: one that raises would break every command
        configure(argparse.ArgumentParser(prog=f"lorakit {name}"))
        self._claim(self.commands, name, (help, configure, run), f"command {name!r}", info)

    # -- lookups -------------------------------------------------------------------
    def provider(self, kind: str, name: str) -> PluginInfo | None:
        """The plugin that registered the primitive ``kind``/``name`` (None if none did)."""
        label = f"{kind} {name!r}"
        return next((info for info in self.plugins.values() if label in info.registered), None)

    def plugin_of(self, primitive: Any) -> str | None:
        """The name of the plugin that registered ``primitive``'s kind and name."""
        info = self.provider(primitive.kind, primitive.name)
        return None if info is None else info.name

    def primitive_class(self, kind: str, name: str) -> type:
        table = self.load().primitives[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise AdapterError(
                f"unknown {kind} {name!r}; registered {kind}s: {known}. "
                "Install the plugin that provides it or fix the name."
            )
        return table[name]

    def create(self, kind: str, value: Any) -> Primitive | None:
        """A primitive instance from an instance, a name or a spec dict."""
        if value is None or isinstance(value, Primitive):
            if isinstance(value, Primitive) and value.kind != kind:
                raise AdapterError(f"{type(value).__name__} is a {value.kind}, not a {kind}")
            return value
        spec = as_spec(value)
        assert spec is not None
        cls = self.primitive_class(kind, spec["name"])
        try:
            return cls(**spec["args"])
        except TypeError as exc:
            raise AdapterError(f"{kind} {spec['name']!r}: bad arguments {spec['args']!r} ({exc})") from None

    def recipe(self, name: str) -> Recipe:
        recipes = self.load().recipes
        if name not in recipes:
            raise AdapterError(
                f"unknown recipe {name!r}; registered recipes: {', '.join(sorted(recipes)) or 'none'}"
            )
        return recipes[name]

    def layer_kind(self, module: Any) -> Any | None:
        """The layer kind adapting ``module``, nearest registered class first: one registered
        for the type of the module's own ``weight`` parameter when that is a tensor subclass
        (torchao's ``NF4Tensor`` in a plain ``nn.Linear``), else one for the module's type.
        The weight decides first: the same ``nn.Linear`` is a float or a quantized layer by
        what its weight holds."""
        import torch  # imported by now (every caller holds a module); kept local to this lookup

        layers = self.load().layers
        weight = getattr(module, "_parameters", {}).get("weight")  # its own, not a wrapper's property
        plain = (*torch.Tensor.__mro__, torch.nn.Parameter)  # a registered subclass only, never these
        for cls in (*(type(weight).__mro__ if isinstance(weight, torch.Tensor) else ()), *type(module).__mro__):
            if cls in plain:
                continue
            kind = layers.get(cls) or layers.get(f"{cls.__module__}.{cls.__qualname__}")
            if kind is not None:
                return kind.resolve() if hasattr(kind, "resolve") else kind  # a LazyKind: built now
        return None


def type_name(t: type | str) -> str:
    """A registered layer key as people read it: a type's name, or a qualified name's last part."""
    return t.rpartition(".")[2] if isinstance(t, str) else t.__name__


class _PluginFailed(Exception):
    """A hook of the plugin being registered failed; nothing of it is kept."""


registry = Registry()


def register_plugin(module: Any, name: str | None = None) -> None:
    registry.load().register_plugin(module, name)
