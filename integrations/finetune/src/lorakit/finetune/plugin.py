"""Hooks of lorakit-finetune: the ``finetune``, ``compare`` and ``sweep`` subcommands."""

from lorakit.core import hookimpl


@hookimpl
def lorakit_commands(register):
    from .cli import configure_compare, configure_finetune, configure_sweep, run_compare, run_finetune, run_sweep

    register("finetune", "fine-tune a local transformers model with any recipe or composition "
             "(default: MiniLM-L6 on the VADER lexicon, offline)", configure_finetune, run_finetune)
    register("compare", "the same fine-tune for several recipes: one table and one plot (the demo)",
             configure_compare, run_compare)
    register("sweep", "recipes x learning rates x seeds: metric vs learning rate, loss curves, a table (resumable)",
             configure_sweep, run_sweep)
