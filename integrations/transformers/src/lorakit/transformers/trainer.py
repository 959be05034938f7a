"""Train a lorakit model with ``transformers.Trainer`` — no Trainer subclass needed.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LorakitCallback()])
    trainer.train()                              # checkpoints hold the adapter only
    trainer.train(resume_from_checkpoint=True)   # resumes from them

What the callback does, and why:

- **Adapter-only checkpoints.** ``Trainer`` saves with ``model.save_pretrained``,
  which drops every key listed in ``model._keys_to_ignore_on_save``. The callback
  sets that to a live list: the base model's keys while the model has a lorakit
  adapter (the model's own list once it is unloaded). So each
  ``checkpoint-N/model.safetensors`` — and ``trainer.save_model()`` — holds only
  the adapter tensors, named as in ``model.state_dict()``. ``on_save`` also writes
  lorakit's native checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``)
  into the same folder, so ``lorakit.core.load(base, "checkpoint-N")`` works on a
  fresh model. Under FSDP2 or DeepSpeed ZeRO-3 every rank gathers the adapter's shards
  and rank 0 writes them whole (``lorakit.core.distributed.save_full``): never one rank's
  shard, never ZeRO-3's empty ``Size([0])`` placeholders.
- **Resume.** ``Trainer`` reloads ``model.safetensors`` non-strictly; the keys it
  does not find are exactly the ignored base keys, so it loads the adapter silently,
  then restores optimizer, scheduler, RNG and data position itself. The model must
  have the same adapter applied (as when the run started).
- **Gradient checkpointing.** With checkpointing on, a frozen embedding output does
  not require grad, and re-entrant checkpointing then drops the adapter's gradients;
  the callback makes the input embeddings' output require grad (as PEFT does) when
  the model has not done so already.
"""

from __future__ import annotations

import os

from torch import nn

from lorakit.core import AdapterError, adapted_layers, save
from lorakit.core.distributed import is_sharded, save_full
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def adapter_keys(model: nn.Module) -> set[str]:
    """The ``model.state_dict()`` keys that belong to lorakit adapters (not base weights)."""
    keys = set()
    for name, layer in adapted_layers(model).items():
        keys.update(f"{name}.{k}" for k in layer.state_dict() if not k.startswith("base."))
    return keys


class BaseKeys:
    """A live ``_keys_to_ignore_on_save``: every non-adapter key of ``model`` while it
    has a lorakit adapter, else the model's own list. Computed on use, so merging or
    unloading the adapter restores normal saving."""

    def __init__(self, model: nn.Module, own=None):
        self.model = model  # a strong reference: deepcopy maps it to the copy
        self.own = list(own or [])

    def _keys(self) -> list[str]:
        ours = adapter_keys(self.model)
        if not ours:
            return self.own
        return [k for k in self.model.state_dict() if k not in ours]

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key) -> bool:
        return key in self._keys()

    def __repr__(self) -> str:
        return f"BaseKeys({len(self)} keys)"


def adapter_only_saving(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained`` (and ``Trainer`` checkpoints) write only the
    lorakit adapter's tensors while the model has one; idempotent."""
    if not adapted_layers(model):
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter; apply one before creating the Trainer")
    if not isinstance(model.__dict__.get("_keys_to_ignore_on_save"), BaseKeys):
        model._keys_to_ignore_on_save = BaseKeys(model, getattr(model, "_keys_to_ignore_on_save", None))
    return model


class LorakitCallback(TrainerCallback):
    """Adapter-only checkpoints, resume and gradient checkpointing for ``Trainer``.

    ``native=True`` also writes lorakit's native checkpoint into every
    ``checkpoint-N`` folder (``lorakit.core.load`` reads it).
    """

    def __init__(self, native: bool = True):
        self.native = native

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            adapter_only_saving(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        adapter_only_saving(model)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing and not hasattr(model, "_require_grads_hook") and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.native or model is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if is_sharded(model):  # FSDP2 / ZeRO-3: every rank gathers (the callback runs on all), rank 0 writes
            save_full(model, folder)
        elif args.should_save:
            save(model, folder)
