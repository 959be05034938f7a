"""Registers the built-in magnitude heads and the recipe built on DoRA."""

from lorakit.core import hookimpl

from . import DoRA


@hookimpl
def lorakit_primitives(register):
    for cls in (DoRA,):
        register(cls)


@hookimpl
def lorakit_recipes(register):
    register("dora", generator="direct", normalizer="scale", init="kaiming", magnitude="dora",
             description="DoRA (Liu et al., 2024): W_eff = diag(m/‖W̄ + BA‖)·(W̄ + BA)")
