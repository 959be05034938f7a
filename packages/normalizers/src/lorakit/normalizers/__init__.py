"""lorakit normalizers: map the slots (B, d, A) to effective factors (B', A')."""

from .scale import Scale

__all__ = ["Scale"]
