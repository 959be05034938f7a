"""lorakit initializers: (W̄, r) → B0, d0, A0."""

from .kaiming import Kaiming

__all__ = ["Kaiming"]
