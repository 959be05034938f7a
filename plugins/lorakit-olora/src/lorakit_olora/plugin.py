"""Entry point ``olora`` (group ``lorakit``): registers the initializer and a recipe."""

from lorakit.core import hookimpl

from .olora import OLoRA


@hookimpl
def lorakit_primitives(register):
    register(OLoRA)


@hookimpl
def lorakit_recipes(register):
    register("olora", generator="direct", normalizer="scale", init="olora",
             description="OLoRA (Büyükakyüz, 2024): B0, A0 from the QR of W̄, residualized")
