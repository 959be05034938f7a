"""Registers the built-in initializers and the recipe built on PiSSA."""

from lorakit.core import hookimpl

from . import LDU, PiSSA


@hookimpl
def lorakit_primitives(register):
    for cls in (PiSSA, LDU):
        register(cls)


@hookimpl
def lorakit_recipes(register):
    register("pissa", generator="direct", normalizer="scale", init="pissa",
             description="PiSSA (Meng et al., 2024): B0 A0 = rank-r principal part of W̄, "
                         "the rest kept as the residual weight")
