"""lorakit-olora: the OLoRA initializer as a lorakit plugin."""

from .olora import OLoRA

__all__ = ["OLoRA"]
