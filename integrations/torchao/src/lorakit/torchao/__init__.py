"""lorakit on torchao-quantized bases (QLoRA with torchao's NF4, int8 weight-only).

Installing ``lorakit-torchao`` registers layer kinds for the weight tensor types
(:mod:`.kinds`); usage does not change::

    quantize_(model, Int8WeightOnlyConfig())          # or torchtune's nn.Parameter(to_nf4(w))
    Adapter.from_recipe("dora", rank=8).apply(model)

:func:`quantize` builds the same weights by hand from a float model.
"""

from __future__ import annotations

import importlib
from typing import Any

# Importing torchao costs ~2 s and logs warnings about optional kernels: the plugin registers
# its kinds by name (lorakit.core.layer_kinds.LazyKind) and this package loads torchao only
# when one of these names is used.
_LAZY = {"NF4Kind": ".kinds", "Int8WeightOnlyKind": ".kinds", "quantize": ".weights",
         "QUANTIZE_MODES": ".weights", "DEFAULT_SKIP": ".weights"}

__all__ = ["Int8WeightOnlyKind", "NF4Kind", "QUANTIZE_MODES", "quantize"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
