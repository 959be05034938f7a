"""Hooks of lorakit-bench: the ``bench`` subcommand."""

from lorakit.core import hookimpl


@hookimpl
def lorakit_commands(register):
    from .cli import HELP, configure, run

    register("bench", HELP, configure, run)


@hookimpl(specname="lorakit_commands")
def lorakit_plan_command(register):
    from .plan_cli import HELP, configure, run

    register("plan", HELP, configure, run)
