"""lorakit-vera: VeRA as a lorakit plugin (a generator and an initializer)."""

from .vera import SharedRandom, VeRA

__all__ = ["SharedRandom", "VeRA"]
