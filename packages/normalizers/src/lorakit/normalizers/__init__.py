"""lorakit normalizers: map the slots (B, d, A) to effective factors (B', A')."""

from lorakit.core.lora import Scale  # re-exported: it lives in core now

from .delora import DeLoRA

__all__ = ["DeLoRA", "Scale"]
