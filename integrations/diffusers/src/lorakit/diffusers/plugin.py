"""Hooks of lorakit-diffusers: default targets per diffusers model class and the
``diffusers`` and ``kohya`` exporters."""

from lorakit.core import hookimpl

from .export import export_diffusers
from .kohya import export_kohya
from .targets import ATTENTION, MODELS


@hookimpl
def lorakit_targets(register):
    for model_class in MODELS:
        register(model_class, ATTENTION)


@hookimpl
def lorakit_exporters(register):
    register("diffusers", export_diffusers)
    register("kohya", export_kohya)
