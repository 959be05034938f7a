"""lorakit-ia3: (IA)³-style learned output gains as a lorakit magnitude head."""

from .gain import IA3Gain

__all__ = ["IA3Gain"]
