"""lorakit-lorafa: LoRA-FA's generator as a lorakit plugin."""

from .lorafa import LoRAFA

__all__ = ["LoRAFA"]
