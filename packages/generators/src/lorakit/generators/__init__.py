"""lorakit generators: how the trainable slots are parameterized."""

from .direct import Direct

__all__ = ["Direct"]
