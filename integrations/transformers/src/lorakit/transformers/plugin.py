"""Hooks of lorakit-transformers."""

from lorakit.core import hookimpl  # noqa: F401
