"""lorakit finetune / compare: offline fine-tuning of a pretrained model with any recipe.

    from lorakit.finetune import FinetuneConfig, finetune, compare
    summary = finetune(FinetuneConfig(recipe="dora", steps=100))
    compare(["lora", "dora"], FinetuneConfig(steps=100, out="runs/cmp"))

Command line: ``lorakit finetune --help``, ``lorakit compare --help`` (docs/finetune.md).
The names below are imported on first use, so that loading the plugin (every
``lorakit`` command does) costs no torch/matplotlib import.
"""

from importlib import import_module

_EXPORTS = {
    "DEFAULT_RECIPES": "compare", "compare": "compare", "build_adapter": "compose", "parse_spec": "compose",
    "FinetuneError": "errors", "Interrupted": "errors", "FinetuneConfig": "train", "finetune": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
