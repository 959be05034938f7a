"""lorakit initializers: (W̄, r) → B0, d0, A0."""

from lorakit.core.lora import Kaiming  # re-exported: it lives in core now

from .ldu import LDU
from .pissa import PiSSA

__all__ = ["LDU", "Kaiming", "PiSSA"]
