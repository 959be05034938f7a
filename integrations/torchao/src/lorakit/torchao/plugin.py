"""lorakit plugin: the torchao layer kinds (entry point ``lorakit``/``torchao``).

torchao keeps the module a plain ``nn.Linear`` and puts the quantization in the weight's
tensor type, so the kinds are registered for the tensor types, not for a module type."""

from __future__ import annotations

from lorakit.core import hookimpl
from torchao.quantization import Int8Tensor, NF4Tensor

from .kinds import Int8WeightOnlyKind, NF4Kind


@hookimpl
def lorakit_layers(register):
    register(NF4Tensor, NF4Kind())
    register(Int8Tensor, Int8WeightOnlyKind())
