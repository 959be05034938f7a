"""Entry point ``lorafa`` (group ``lorakit``): registers the generator and a recipe."""

from lorakit.core import hookimpl
from lorakit.core.lora import Kaiming, Scale

from .lorafa import LoRAFA


@hookimpl
def lorakit_primitives(register):
    register(LoRAFA)


@hookimpl
def lorakit_recipes(register):
    register("lora-fa", generator=LoRAFA.name, normalizer=Scale.name, init=Kaiming.name,
             description="LoRA-FA (Zhang et al., 2023): A frozen at its random start, only B trains")
