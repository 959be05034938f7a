"""Hooks of lorakit-transformers: the ``Conv1D`` layer kind, default targets per
architecture, the ``peft`` exporter and the ``export`` command."""

from lorakit.core import hookimpl
from transformers.pytorch_utils import Conv1D

from .conv1d import Conv1DKind
from .moe import DecoratedExperts, TransformersExpertsKind
from .peft_writer import export_peft
from .targets import DEFAULT_TARGETS


@hookimpl
def lorakit_layers(register):
    register(Conv1D, Conv1DKind())
    register(DecoratedExperts, TransformersExpertsKind())  # fused MoE expert tensors (target_parameters)


@hookimpl
def lorakit_targets(register):
    for model_type, names in DEFAULT_TARGETS.items():
        register(model_type, names)


@hookimpl
def lorakit_exporters(register):
    register("peft", export_peft)


@hookimpl
def lorakit_commands(register):
    from .export_cli import configure_export, run_export

    register("export", "write a native lorakit checkpoint as PEFT, diffusers, kohya (any registered format)",
             configure_export, run_export)
