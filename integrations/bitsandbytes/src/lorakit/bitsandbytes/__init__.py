"""lorakit on bitsandbytes-quantized bases (QLoRA and every other recipe).

Installing ``lorakit-bitsandbytes`` registers the layer kinds (:mod:`.kinds`); usage
does not change::

    model = AutoModel.from_pretrained(name, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    prepare_for_kbit_training(model)                  # input grads, norms in fp32, checkpointing
    Adapter.from_recipe("dora", rank=8).apply(model)

:func:`quantize` builds the same layers by hand from a float model (what
``lorakit finetune --quantize`` uses; no transformers loader needed).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

import bitsandbytes as bnb

from .kinds import Linear4bitKind, Linear8bitLtKind

QUANTIZE_MODES = ("nf4", "fp4", "int8")
DEFAULT_SKIP = ("classifier", "lm_head", "score", "pooler")  # heads stay in float, as transformers does

__all__ = ["Linear4bitKind", "Linear8bitLtKind", "QUANTIZE_MODES", "frozen_base_bytes", "prepare_for_kbit_training",
           "quantize"]


def _quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    device = linear.weight.device
    bias = linear.bias is not None
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=mode)
    state = {k: v.detach().to("cpu") for k, v in linear.state_dict().items()}
    if mode == "int8":
        state = {k: v.to(torch.float16) if k == "weight" else v for k, v in state.items()}
    q.load_state_dict(state)
    return q.to(device)  # bitsandbytes quantizes on the move to a device


def quantize(model: nn.Module, mode: str = "nf4", *, compute_dtype: torch.dtype = torch.float32,
             double_quant: bool = False, skip: Iterable[str] = DEFAULT_SKIP) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but those whose last name is in ``skip``)
    by its bitsandbytes form, in place: ``mode`` ``"nf4"``/``"fp4"`` (``Linear4bit``,
    ``compute_dtype``, ``double_quant``) or ``"int8"`` (``Linear8bitLt``). What
    ``BitsAndBytesConfig`` does at load time, for a model already in memory."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    skip = set(skip)
    chosen = [(n, m) for n, m in model.named_modules()
              if type(m) is nn.Linear and n.rpartition(".")[2] not in skip]
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _quantized_linear(module, mode, compute_dtype, double_quant))
    # the flags transformers' loader sets: PEFT wraps bitsandbytes layers only when they are there
    setattr(model, "is_loaded_in_8bit" if mode == "int8" else "is_loaded_in_4bit", True)  # noqa: B010
    return model


def frozen_base_bytes(model: nn.Module) -> int:
    """Bytes held by the model's base (everything but lorakit's adapter tensors):
    parameters and buffers, quantized weights at their packed size plus their
    quantization state (absmax, code, SCB)."""
    from lorakit.core import adapted_layers

    adapter = {id(t) for layer in adapted_layers(model).values()
               for t in (*layer.slots.parameters(), *layer.slots.buffers(), *layer.buffers(recurse=False))}
    total = 0
    for module in model.modules():
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if id(t) in adapter:
                continue
            total += t.numel() * t.element_size()
            state = getattr(t, "quant_state", None)
            if state is not None:
                total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                             if isinstance(v, torch.Tensor))
        scb = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True,
                              gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """What PEFT's ``prepare_model_for_kbit_training`` does, for lorakit (before or after apply):

    - freezes the base (adapter slots stay trainable when already applied);
    - casts fp16/bf16 float parameters (norms, embeddings, heads) to fp32 for stable
      training; quantized weights are untouched;
    - with ``gradient_checkpointing``: makes the input embeddings' output require
      grad (a checkpointed block whose inputs need no grad would get no gradient to
      the adapters inside) and enables transformers' checkpointing (non-reentrant by
      default).
    """
    from lorakit.core import adapted_layers

    trainable = {id(p) for layer in adapted_layers(model).values() for p in layer.slots.parameters()}
    for p in model.parameters():
        if id(p) not in trainable:
            p.requires_grad_(False)
            quantized = type(p).__name__ in ("Params4bit", "Int8Params")
            if not quantized and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    if gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers "
                             "model); pass gradient_checkpointing=False and checkpoint it yourself")
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
