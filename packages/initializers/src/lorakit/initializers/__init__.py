"""lorakit initializers: (W̄, r) → B0, d0, A0."""

from .kaiming import Kaiming
from .ldu import LDU
from .pissa import PiSSA

__all__ = ["LDU", "Kaiming", "PiSSA"]
