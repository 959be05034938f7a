"""Hooks of lorakit-diffusers."""

from lorakit.core import hookimpl  # noqa: F401
