"""Core's own plugin: the layer kinds torch itself provides (Linear, Conv2d) and the
LoRA baseline (``lorakit.core.lora``) with the recipes built on it alone."""

from .experts import EXPERT_KIND, ExpertMatrix
from .hookspecs import hookimpl
from .layer_kinds import BUILTIN_KINDS
from .lora import Direct, Kaiming, Scale


@hookimpl
def lorakit_layers(register):
    for module_type, kind in BUILTIN_KINDS.items():
        register(module_type, kind)
    register(ExpertMatrix, EXPERT_KIND)  # one expert of a fused tensor (lorakit.core.experts)


@hookimpl
def lorakit_primitives(register):
    for cls in (Direct, Scale, Kaiming):
        register(cls)


@hookimpl
def lorakit_recipes(register):
    register("lora", generator=Direct.name, normalizer=Scale.name, init=Kaiming.name,
             description="LoRA (Hu et al., 2021): ΔW = (alpha/r)·B A, B0 = 0")
    register("rslora", generator=Direct.name, normalizer={"name": Scale.name, "args": {"rs": True}}, init=Kaiming.name,
             description="rank-stabilized LoRA: scale alpha/√r")
