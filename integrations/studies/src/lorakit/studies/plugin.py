"""Hooks of lorakit-studies: the ``mf`` subcommand."""

from lorakit.core import hookimpl


@hookimpl
def lorakit_commands(register):
    from .mf import configure, run

    register("mf", "OP-LoRA's matrix-factorization study (its §4.1): MF vs OP-MF", configure, run)
