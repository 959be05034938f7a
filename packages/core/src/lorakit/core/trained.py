"""Base tensors an adapter trains besides its own slots (issue 14): biases (``bias=``).

They are the base model's own parameters, trained in place as PEFT's ``bias`` option
does, so a checkpoint saves them under their full parameter names and an export
writes them in PEFT's layout. ``bias="all"`` is every parameter named ``bias``
(PEFT's ``"all"``: LayerNorm biases included); ``"adapted"`` the biases of the
adapted layers (PEFT's ``"lora_only"``).
"""

from __future__ import annotations

from torch import nn

from .primitives import AdapterError

# which base biases each mode trains: (is the bias an adapted layer's) -> trained
BIAS_MODES = {"none": lambda adapted: False, "all": lambda adapted: True, "adapted": lambda adapted: adapted}
# lorakit's mode -> PEFT's LoraConfig.bias
PEFT_BIAS = {"none": "none", "all": "all", "adapted": "lora_only"}


def check_bias(value, field: str = "adapter.bias") -> str:
    if not isinstance(value, str) or value not in BIAS_MODES:
        raise AdapterError(f"{field}={value!r:.40}: must be one of {', '.join(map(repr, BIAS_MODES))}")
    return value


def trained_biases(model: nn.Module, mode: str | None = None) -> dict[str, nn.Parameter]:
    """The base biases ``model``'s adapter trains, by full parameter name (an adapted
    layer's is ``<module>.base.bias``). ``mode`` defaults to the applied adapter's."""
    from .adapter import adapted_layers  # adapter imports this module

    mode = mode or getattr(model, "lorakit_config", {}).get("bias", "none")
    layers = adapted_layers(model)
    adapter_owned = {id(p) for layer in layers.values() for p in layer.slots.parameters()}
    adapted = {f"{name}.base.bias" for name in layers}
    return {name: p for name, p in model.named_parameters()
            if name.rpartition(".")[2] == "bias" and id(p) not in adapter_owned
            and BIAS_MODES[mode](name in adapted)}
