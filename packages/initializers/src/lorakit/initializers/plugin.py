"""Registers the built-in initializers with lorakit."""

from lorakit.core import hookimpl

from . import Kaiming


@hookimpl
def lorakit_primitives(register):
    for cls in (Kaiming,):
        register(cls)
