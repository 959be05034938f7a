"""TRL's trainers on a lorakit model (docs/integrations/trl.md).

    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, callbacks=[LorakitCallback()])
    trainer = trl.DPOTrainer(model=model, ref_model=reference_model(model), args=cfg,
                             train_dataset=pairs, callbacks=[LorakitCallback()])

``SFTTrainer`` and ``GRPOTrainer`` are ``transformers.Trainer``\\ s: ``LorakitCallback`` gives
them adapter-only checkpoints, native checkpoints beside them and resume, as for ``Trainer``.

``DPOTrainer`` needs a reference policy. With a PEFT model and ``ref_model=None`` it disables the
adapter for the reference pass; for any other model it loads a second copy of the weights from
``config.name_or_path``. :func:`reference_model` gives it lorakit's equivalent of PEFT's path: an
object that *is* the policy seen with its adapter disabled (``lorakit.core.disabled``) — every call,
whatever TRL patched into ``forward`` (its fused LM head), runs the base model; it holds no
parameter and shares every weight with the policy, so nothing is copied and TRL's
``prepare_model``/``eval()`` on it leave the policy alone.
"""

from __future__ import annotations

from torch import nn

from lorakit.core import AdapterError, adapted_layers, disabled


class AdapterDisabled(nn.Module):
    """The policy ``model`` with its lorakit adapter off: ``ref(*a, **kw)`` is
    ``with disabled(model): model(*a, **kw)``. Attributes TRL reads (``config``,
    ``base_model``, ``get_output_embeddings``, ...) are the policy's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not adapted_layers(model):
            raise AdapterError(f"reference_model: {type(model).__name__} has no lorakit adapter to disable; "
                               "apply one first (or pass TRL a ref_model of your own)")
        object.__setattr__(self, "policy", model)  # not a submodule: no parameter is registered twice

    def __call__(self, *args, **kwargs):
        with disabled(self.policy):
            return super().__call__(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.policy(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["policy"], name)


def reference_model(model: nn.Module) -> AdapterDisabled:
    """DPO's reference policy for a lorakit ``model``: the base model with the adapter disabled,
    no second copy of the weights (pass it as ``DPOTrainer(ref_model=...)``)."""
    return AdapterDisabled(model)
