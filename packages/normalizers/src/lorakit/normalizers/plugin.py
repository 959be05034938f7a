"""Registers the built-in normalizers and the recipes built on them."""

from lorakit.core import hookimpl

from . import DeLoRA, Scale


@hookimpl
def lorakit_primitives(register):
    for cls in (Scale, DeLoRA):
        register(cls)


@hookimpl
def lorakit_recipes(register):
    register("lora", generator="direct", normalizer="scale", init="kaiming",
             description="LoRA (Hu et al., 2021): ΔW = (alpha/r)·B A, B0 = 0")
    register("rslora", generator="direct", normalizer={"name": "scale", "args": {"rs": True}},
             init="kaiming", description="rank-stabilized LoRA: scale alpha/√r")
    register("delora", generator="direct", normalizer="delora",
             init={"name": "kaiming", "args": {"zero_b": False}},
             description="DeLoRA (Bini et al., 2025): ΔW = (λ/r)·B Ξ A diag(‖W̄ columns‖), "
                         "both factors Kaiming, the initial update residualized")
