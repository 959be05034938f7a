"""lorakit generators: how the trainable slots are parameterized."""

from .diagonal import Diagonal
from .direct import Direct
from .mlp import MLP

__all__ = ["Diagonal", "Direct", "MLP"]
