"""Registers DeLoRA and its recipe (the LoRA scaling ships with core)."""

from lorakit.core import hookimpl

from . import DeLoRA


@hookimpl
def lorakit_primitives(register):
    register(DeLoRA)


@hookimpl
def lorakit_recipes(register):
    register("delora", generator="direct", normalizer="delora",
             init={"name": "kaiming", "args": {"zero_b": False}},
             description="DeLoRA (Bini et al., 2025): ΔW = (λ/r)·B Ξ A diag(‖W̄ columns‖), "
                         "both factors Kaiming, the initial update residualized")
