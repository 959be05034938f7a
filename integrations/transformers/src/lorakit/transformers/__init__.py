"""lorakit for HF transformers: default targets, ``Conv1D``, PEFT-format export and
import, and ``Trainer`` support (docs/integrations/transformers.md)."""

from .conv1d import Conv1DKind
from .peft_export import (
    PeftExport,
    TruncationWarning,
    export_peft,
    lora_config,
    peft_export,
    peft_state_dict,
)
from .peft_import import PeftImportError, import_peft, read_peft
from .targets import DEFAULT_TARGETS

__all__ = [
    "DEFAULT_TARGETS", "Conv1DKind", "PeftExport", "TruncationWarning", "export_peft",
    "PeftImportError", "import_peft", "lora_config", "peft_export", "peft_state_dict", "read_peft",
]
