"""lorakit magnitude heads: rescale the rows of V = W̄ + ΔW."""

from .dora import DoRA

__all__ = ["DoRA"]
