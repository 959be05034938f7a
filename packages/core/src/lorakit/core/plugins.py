"""Plugin manager and registry (DESIGN §5).

Plugins are found through the entry-point group ``lorakit``; built-ins are plugins
like any other. Loading is lazy (first lookup) and idempotent. Environment:

- ``LORAKIT_DISABLE_AUTOLOAD=1``: load no entry points (register plugins by hand
  with :func:`register_plugin`);
- ``LORAKIT_LOAD_PLUGINS=core,generators``: allow-list of entry-point names.

A plugin that fails to import, raises in a hook or registers a name that is already
taken is recorded in :data:`registry.failures` with the reason; the others load.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .primitives import KINDS, AdapterError, Primitive

HOOKS = tuple(name for name in vars(hookspecs) if name.startswith("lorakit_"))


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)


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


class Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("lorakit")
        self.pm.add_hookspecs(hookspecs)
        self.loaded = False
        self.primitives: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
        self.recipes: dict[str, Recipe] = {}
        self.layers: dict[type, Any] = {}
        self.targets: dict[str, list[str]] = {}
        self.exporters: dict[str, Callable] = {}
        self.commands: dict[str, tuple] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: dict[str, str] = {}

    # -- loading ---------------------------------------------------------------
    def load(self) -> Registry:
        if self.loaded:
            return self
        self.loaded = True
        if os.environ.get("LORAKIT_DISABLE_AUTOLOAD", "") not in ("", "0"):
            return self
        allow = os.environ.get("LORAKIT_LOAD_PLUGINS")
        allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
        for ep in sorted(entry_points(group="lorakit"), key=lambda e: (e.name != "core", e.name)):
            if allowed is not None and ep.name not in allowed or ep.name in self.plugins:
                continue
            dist = getattr(ep, "dist", None)
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                self._fail(ep.name, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self.register_plugin(module, ep.name, dist.name if dist else None, dist.version if dist else None)
        return self

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
        self.plugins[name] = info
        for hook in HOOKS:
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name == name:
                    info.hooks.append(hook)
                    self._run_hook(info, hook, impl.function)

    def _fail(self, name: str, reason: str) -> None:
        self.failures[name] = reason
        warnings.warn(f"lorakit plugin {name!r}: {reason}", stacklevel=3)

    def _run_hook(self, info: PluginInfo, hook: str, function: Callable) -> None:
        register = getattr(self, "_register_" + hook.removeprefix("lorakit_"))
        try:
            function(register=lambda *a, **k: register(info, *a, **k))
        except Exception as exc:
            self._fail(info.name, f"{hook} raised {type(exc).__name__}: {exc}")

    # -- register callbacks ------------------------------------------------------
    def _claim(self, table: dict, key: Any, value: Any, label: str, info: PluginInfo) -> None:
        if key in table:
            raise AdapterError(f"{label} is already registered; rename it in plugin {info.name!r}")
        table[key] = value
        info.registered.append(label)

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

    def _register_layers(self, info: PluginInfo, module_type: type, kind: Any) -> None:
        self._claim(self.layers, module_type, kind, f"layer {module_type.__name__}", info)

    def _register_targets(self, info: PluginInfo, model_type: str, names: list[str]) -> None:
        self._claim(self.targets, model_type, list(names), f"targets {model_type!r}", info)

    def _register_exporters(self, info: PluginInfo, name: str, function: Callable) -> None:
        self._claim(self.exporters, name, function, f"exporter {name!r}", info)

    def _register_commands(self, info: PluginInfo, name: str, help: str,
                           configure: Callable, run: Callable) -> None:
        self._claim(self.commands, name, (help, configure, run), f"command {name!r}", info)

    # -- lookups -------------------------------------------------------------------
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
        for cls in type(module).__mro__:
            if cls in self.load().layers:
                return self.layers[cls]
        return None


registry = Registry()


def register_plugin(module: Any, name: str | None = None) -> None:
    registry.load().register_plugin(module, name)
