"""lorakit generators: how the trainable slots are parameterized."""

from lorakit.core.lora import Direct  # re-exported: it lives in core now

from .diagonal import Diagonal  # re-exported: it lives in core now
from .mlp import MLP

__all__ = ["Diagonal", "Direct", "MLP"]
