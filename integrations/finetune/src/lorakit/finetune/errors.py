"""The error ``lorakit finetune`` raises for bad input (printed as one line, exit code 2)."""

from lorakit.core import AdapterError


class FinetuneError(AdapterError):
    """Bad input to ``lorakit finetune`` / ``compare``: the message names the input and the fix."""


class Interrupted(Exception):
    """Ctrl-C during training; ``checkpoint`` is the last complete checkpoint (or None)."""

    def __init__(self, checkpoint):
        super().__init__(f"interrupted; last checkpoint: {checkpoint}")
        self.checkpoint = checkpoint
