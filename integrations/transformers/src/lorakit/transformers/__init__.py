"""lorakit for HF transformers: default targets, ``Conv1D``, PEFT-format export and
import, and ``Trainer`` support (docs/integrations/transformers.md).

Names are imported on first use, so loading the plugin registry (which imports
this package) does not pay for ``Trainer`` or PEFT imports.
"""

from importlib import import_module

_EXPORTS = {
    "Conv1DKind": "conv1d",
    "DEFAULT_TARGETS": "targets",
    "PeftExport": "peft_writer",
    "delora_export": "delora_peft",
    "TruncationWarning": "peft_writer",
    "export_peft": "peft_writer",
    "lora_config": "peft_writer",
    "peft_export": "peft_writer",
    "peft_state_dict": "peft_writer",
    "PeftImportError": "peft_reader",
    "import_peft": "peft_reader",
    "read_peft": "peft_reader",
    "LorakitCallback": "trainer",
    "adapter_keys": "trainer",
    "adapter_only_saving": "trainer",
    "AdapterDisabled": "trl",
    "reference_model": "trl",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorakit.transformers' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
