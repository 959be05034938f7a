"""lorakit plugin: the bitsandbytes layer kinds (entry point ``lorakit``/``bitsandbytes``)."""

from __future__ import annotations

import bitsandbytes as bnb
from lorakit.core import hookimpl

from .kinds import Linear4bitKind, Linear8bitLtKind


@hookimpl
def lorakit_layers(register):
    # LinearNF4 / LinearFP4 / Linear4bit with any compute dtype and (double) quantization
    # are the same class hierarchy: the registry walks the MRO
    register(bnb.nn.Linear4bit, Linear4bitKind())
    register(bnb.nn.Linear8bitLt, Linear8bitLtKind())
