"""Hooks of lorakit-finetune: the ``finetune`` and ``compare`` subcommands."""

from lorakit.core import hookimpl


@hookimpl
def lorakit_commands(register):
    from .cli import configure_compare, configure_finetune, run_compare, run_finetune

    register("finetune", "fine-tune a local transformers model with any recipe or composition "
             "(default: MiniLM-L6 on the VADER lexicon, offline)", configure_finetune, run_finetune)
    register("compare", "the same fine-tune for several recipes: one table and one plot (the demo)",
             configure_compare, run_compare)
