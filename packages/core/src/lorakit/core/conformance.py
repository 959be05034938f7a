"""Moved: the conformance kit is its own distribution, ``lorakit-conformance``
(``lorakit.conformance``), which plugin authors install for their tests."""

import warnings

from lorakit.conformance import *  # noqa: F403
from lorakit.conformance import __all__  # noqa: F401

warnings.warn("lorakit.core.conformance moved to lorakit.conformance (pip install lorakit-conformance)",
              DeprecationWarning, stacklevel=2)
