"""The hooks a lorakit plugin can implement. Each receives a ``register`` callback.

Built-in primitives are plugins too, loaded from the same entry-point group
(``lorakit``) as any third party's. Every hook here has a test and a section in
docs/plugins.md (enforced by tests/test_meta_hooks.py).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("lorakit")
hookimpl = pluggy.HookimplMarker("lorakit")


@hookspec
def lorakit_primitives(register):
    """Register primitive classes: ``register(cls)``.

    ``cls`` subclasses one of ``Generator``, ``Normalizer``, ``Initializer``,
    ``Magnitude`` and sets a class attribute ``name`` unique within its kind.
    """


@hookspec
def lorakit_recipes(register):
    """Register named recipes: ``register(name, generator=..., normalizer=...,
    init=..., magnitude=None, description="")``, each primitive given as a
    registered name or ``{"name": ..., "args": {...}}``."""


@hookspec
def lorakit_layers(register):
    """Register how a module type is adapted: ``register(module_type, layer_kind)``
    where ``layer_kind`` is a ``lorakit.core.layer_kinds.LayerKind``; or how a weight
    type is: ``register(tensor_type, layer_kind)`` with a ``torch.Tensor`` subclass that
    a module holds as its ``weight`` (torchao's ``NF4Tensor`` in an ``nn.Linear``). The
    weight's type is looked up first, then the module's, each by nearest base class. A type
    may be given by its qualified name (``"pkg.module.Type"``) with a
    ``lorakit.core.layer_kinds.LazyKind``, so the plugin need not import its library."""


@hookspec
def lorakit_targets(register):
    """Register default target module names for a model family:
    ``register(model_type, ["q_proj", "v_proj", ...])`` (``model_type`` as in a
    transformers config, or a class name)."""


@hookspec
def lorakit_exporters(register):
    """Register file formats an adapted model can be exported to:
    ``register(name, function)`` with ``function(model, path, **options)``."""


@hookspec
def lorakit_commands(register):
    """Register CLI subcommands: ``register(name, help, configure, run)`` where
    ``configure(parser)`` adds arguments and ``run(args)`` returns an exit code."""
