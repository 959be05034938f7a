"""Entry point ``vera`` (group ``lorakit``): the VeRA generator, its initializer and recipe."""

from lorakit.core import hookimpl

from .vera import SharedRandom, VeRA


@hookimpl
def lorakit_primitives(register):
    register(VeRA)
    register(SharedRandom)


@hookimpl
def lorakit_recipes(register):
    register("vera", generator="vera", normalizer="scale", init="shared-random",
             description="VeRA (Kopiczko et al., 2024): ΔW = diag(b)·B·diag(d)·A, A, B frozen and shared")
