"""lorakit-devtools: scaffolding for plugin authors (``lorakit new-plugin``)."""

from .scaffold import KINDS, new_plugin

__all__ = ["KINDS", "new_plugin"]
