"""lorakit.core: composable low-rank adapters.

Core knows no primitive: generators, normalizers, initializers and magnitude heads
arrive through the plugin registry (``lorakit.core.plugins``), built-ins included.
"""

from .adapter import (
    Adapter,
    adapted_layers,
    adapter_config,
    default_targets,
    extension,
    replace_adapter_config,
    set_extension,
)
from .checkpoint import CheckpointError, load, load_optimizer, save
from .hookspecs import hookimpl
from .hotswap import hotswap
from .layer import AdaptedLayer
from .model_ops import (
    ExportedLayer,
    disabled,
    export_factors,
    freeze_generators,
    merge,
    merge_and_unload,
    parameter_report,
    set_enabled,
    trainable_parameters,
    unload,
    unmerge,
)
from .optim import param_groups
from .plugins import register_plugin, registry
from .primitives import (
    DORA_MAGNITUDE,
    AdapterError,
    Composition,
    Generator,
    Initializer,
    Magnitude,
    MergeError,
    Normalizer,
    ParameterSlots,
    Primitive,
    Role,
    Slot,
    SlotInfo,
    SlotsModule,
)

__all__ = [
    "Composition", "DORA_MAGNITUDE", "Role", "SlotInfo", "SlotsModule",
    "Adapter", "AdaptedLayer", "AdapterError", "CheckpointError", "ExportedLayer", "Generator",
    "Initializer", "Magnitude", "MergeError", "Normalizer", "ParameterSlots", "Primitive", "Slot",
    "adapted_layers", "adapter_config", "default_targets", "disabled", "export_factors", "extension",
    "freeze_generators", "replace_adapter_config", "set_extension",
    "hookimpl", "hotswap", "load", "load_optimizer", "merge", "param_groups", "merge_and_unload",
    "parameter_report",
    "register_plugin",
    "registry", "save", "set_enabled", "trainable_parameters", "unload", "unmerge",
]
