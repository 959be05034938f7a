"""lorakit plugin: the torchao layer kinds (entry point ``lorakit``/``torchao``).

torchao keeps the module a plain ``nn.Linear`` and puts the quantization in the weight's
tensor type, so the kinds are registered for the tensor types, not for a module type. They
are registered by qualified name with a kind built on first use: loading this plugin (every
``lorakit`` command, the first ``Adapter``) must not import torchao (~2 s and warnings)."""

from __future__ import annotations

from lorakit.core import hookimpl
from lorakit.core.layer_kinds import LazyKind

#: the qualified names of torchao 0.18's weight tensor types (tests/test_torchao.py checks them)
NF4_TENSOR = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor.NF4Tensor"
INT8_TENSOR = "torchao.quantization.Int8Tensor"


def _nf4_kind():
    from .kinds import NF4Kind

    return NF4Kind()


def _int8_kind():
    from .kinds import Int8WeightOnlyKind

    return Int8WeightOnlyKind()


@hookimpl
def lorakit_layers(register):
    register(NF4_TENSOR, LazyKind(_nf4_kind, package="torchao"))
    register(INT8_TENSOR, LazyKind(_int8_kind, package="torchao"))
