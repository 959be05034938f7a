"""Entry point ``ia3`` (group ``lorakit``): registers the magnitude head."""

from lorakit.core import hookimpl

from .gain import IA3Gain


@hookimpl
def lorakit_primitives(register):
    register(IA3Gain)
