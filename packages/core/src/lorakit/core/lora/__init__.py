"""LoRA itself (Hu et al., 2021, arXiv:2106.09685), the baseline every recipe composes
with: plain parameters (``Direct``), the ``alpha/r`` scaling (``Scale``) and Kaiming
``A0`` with ``B0 = 0`` (``Kaiming``).

They ship with core (registered by core's own plugin, ``lorakit.core.builtin``) so that
``lorakit-core`` alone is a working LoRA library and any one plugin composes with it;
core's machinery (adapter, layer, checkpoints) still asks the registry like for any
third-party primitive.
"""

from .direct import Direct
from .kaiming import Kaiming, kaiming_uniform
from .scale import Scale

__all__ = ["Direct", "Kaiming", "Scale", "kaiming_uniform"]
