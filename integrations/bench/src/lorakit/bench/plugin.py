"""Hooks of lorakit-bench."""

from lorakit.core import hookimpl  # noqa: F401
