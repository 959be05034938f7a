"""Base tensors an adapter trains besides its own slots: biases (``bias=``)
and whole modules (``modules_to_save``).

Biases are the base model's own parameters, trained in place as PEFT's ``bias``
option does, so a checkpoint saves them under their full parameter names and an
export writes them in PEFT's layout. A module to save is replaced by a
:class:`SavedModule` holding the untouched original and a trainable copy, as PEFT's
``ModulesToSaveWrapper``: ``unload``/``disabled()`` restore the original,
``merge_and_unload`` keeps the trained copy. ``bias="all"`` is every parameter named ``bias``
(PEFT's ``"all"``: LayerNorm biases included); ``"adapted"`` the biases of the
adapted layers (PEFT's ``"lora_only"``).
"""

from __future__ import annotations

import copy

import torch
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
    from .adapter import adapted_layers, adapter_config  # adapter imports this module

    mode = mode or adapter_config(model).get("bias", "none")
    if mode == "none":  # trains no bias: no pass over the model's parameters (load calls this 3 times)
        return {}
    layers = adapted_layers(model)
    adapter_owned = {id(p) for layer in layers.values() for p in layer.slots.parameters()}
    adapter_owned |= {id(p) for m in saved_modules(model).values() for p in m.parameters()}  # whole, not bias
    adapted = {f"{name}.base.bias" for name in layers}
    return {name: p for name, p in model.named_parameters()
            if name.rpartition(".")[2] == "bias" and id(p) not in adapter_owned
            and BIAS_MODES[mode](name in adapted)}


class SavedModule(nn.Module):
    """A module trained as a whole: the forward runs ``trained``, a trainable copy of
    ``original`` (kept frozen and untouched), or ``original`` while disabled."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.trained = copy.deepcopy(original)  # a tied weight (lm_head) is untied here, as PEFT does
        self.disabled = False

    def forward(self, *args, **kwargs):
        return (self.original if self.disabled else self.trained)(*args, **kwargs)

    def __getattr__(self, name: str):
        # model code reads attributes of the module it put there (``self.score.weight``)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("trained"), name)


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SavedModule)}


def check_module_names(value, field: str = "adapter.modules_to_save") -> list[str] | None:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if names is None or not all(isinstance(n, str) and n for n in names):
        raise AdapterError(f"{field}={value!r:.80}: give module names (a list of strings)")
    return names


def trained_base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint saves besides the adapted layers: the trained biases by
    parameter name, and each saved module's trained copy as ``<module>.trained.<key>``."""
    state = {name: p.detach() for name, p in trained_biases(model).items()}
    for name, module in saved_modules(model).items():
        state.update({f"{name}.trained.{k}": v.detach() for k, v in module.trained.state_dict().items()})
    return {k: v.contiguous().clone() for k, v in state.items()}


@torch.no_grad()
def load_trained_base_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy :func:`trained_base_state`'s tensors back (keys checked by the caller)."""
    for name, p in trained_biases(model).items():
        p.copy_(tensors[name])
    for name, module in saved_modules(model).items():
        own = {k: tensors[f"{name}.trained.{k}"] for k in module.trained.state_dict()}
        module.trained.load_state_dict(own)


def wrap_saved(model: nn.Module, names: list[str], matches) -> dict[str, SavedModule]:
    """Replace every module whose name ``matches`` one of ``names`` by a
    :class:`SavedModule` (outermost only) and return them."""
    chosen: list[str] = []
    for name, _ in model.named_modules():
        if name and matches(name, names) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    wrapped = {}
    for name in chosen:
        parent, _, child = name.rpartition(".")
        wrapped[name] = SavedModule(model.get_submodule(name))
        setattr(model.get_submodule(parent), child, wrapped[name])
    return wrapped


def unwrap_saved(model: nn.Module, keep: str) -> None:
    """Put back each saved module's ``original`` (unload) or ``trained`` copy (merge)."""
    for name, module in saved_modules(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, getattr(module, keep))
