"""Registers the built-in generators with lorakit (entry point ``generators``)."""

from lorakit.core import hookimpl

from . import Direct


@hookimpl
def lorakit_primitives(register):
    for cls in (Direct,):
        register(cls)
