"""Hooks of lorakit-transformers: the ``Conv1D`` layer kind, default targets per
architecture, the ``peft`` and ``delora`` exporters and the ``export`` command."""

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


def export_peft_delora(model, path, *, max_rank=None, energy: float = 0.999, fold_magnitude: bool = False,
                       base_model_name_or_path: str | None = None, task_type: str | None = None):
    """``export_peft(format="delora")``: PEFT's DeLoRA adapter, always exact (``lorakit
    export --format delora``); truncation and folding are the LoRA format's options."""
    from lorakit.core import AdapterError

    if max_rank is not None or fold_magnitude:
        raise AdapterError("--format delora writes the update exactly (PEFT's DeLoRA): --max-rank and "
                           "--fold-magnitude apply to --format peft; drop them")
    return export_peft(model, path, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                       format="delora")


@hookimpl
def lorakit_exporters(register):
    register("peft", export_peft)
    register("delora", export_peft_delora)  # PEFT's own DeLoRA tuner (peft.tuners.delora)


@hookimpl
def lorakit_commands(register):
    from .export_cli import configure_export, run_export

    register("export", "write a native lorakit checkpoint as PEFT, diffusers, kohya (any registered format)",
             configure_export, run_export)
