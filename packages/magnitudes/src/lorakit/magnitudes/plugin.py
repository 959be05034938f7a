"""Registers the built-in magnitude heads with lorakit."""

from lorakit.core import hookimpl


@hookimpl
def lorakit_primitives(register):
    pass
