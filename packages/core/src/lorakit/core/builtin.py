"""Core's own plugin: the layer kinds torch itself provides (Linear, Conv2d)."""

from .hookspecs import hookimpl
from .layer_kinds import BUILTIN_KINDS


@hookimpl
def lorakit_layers(register):
    for module_type, kind in BUILTIN_KINDS.items():
        register(module_type, kind)
