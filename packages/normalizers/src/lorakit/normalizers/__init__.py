"""lorakit normalizers: map the slots (B, d, A) to effective factors (B', A')."""

from .delora import DeLoRA
from .scale import Scale

__all__ = ["DeLoRA", "Scale"]
