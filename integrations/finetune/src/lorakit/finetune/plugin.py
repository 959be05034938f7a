"""Hooks of lorakit-finetune."""

from lorakit.core import hookimpl  # noqa: F401
