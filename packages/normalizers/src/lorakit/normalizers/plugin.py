"""Registers the built-in normalizers and the recipes built on Scale."""

from lorakit.core import hookimpl

from . import Scale


@hookimpl
def lorakit_primitives(register):
    for cls in (Scale,):
        register(cls)


@hookimpl
def lorakit_recipes(register):
    register("lora", generator="direct", normalizer="scale", init="kaiming",
             description="LoRA (Hu et al., 2021): ΔW = (alpha/r)·B A, B0 = 0")
    register("rslora", generator="direct", normalizer={"name": "scale", "args": {"rs": True}},
             init="kaiming", description="rank-stabilized LoRA: scale alpha/√r")
