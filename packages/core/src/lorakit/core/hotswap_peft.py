"""A PEFT LoRA/DoRA folder as a hot-swap source (``lorakit.core.hotswap``): format knowledge only.

PEFT's update is ``ΔW = s_p · B A``, ``s_p = alpha/r`` (``alpha/√r`` with ``use_rslora``), per
module from ``rank_pattern``/``alpha_pattern``; DoRA adds ``m`` with DoRA's meaning. The model's
scale normalizer computes ``s(r) · B diag(d) A``, so the swap writes

    A = lora_A,   B = lora_B,   d = (s_p / s(r)) · 1,   m = lora_magnitude_vector

(then zero-padded to the model's max_rank like a native source). The model's adapter must be
PEFT's kind: slots held as they are, the scale normalizer without a learnable scale, no residual
(an initializer whose ``B0 A0 ≠ 0``), and a DoRA-meaning magnitude exactly when ``use_dora``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .layer import AdaptedLayer
from .lora import Scale
from .peft_format import DORA_KEY
from .primitives import DORA_MAGNITUDE, AdapterError, ParameterSlots, Role
from .validation import check_regular_file, loads_strict, read_regular_file

PREFIX = "base_model.model."
#: LoraConfig options that change what the adapter computes beyond B, A, s and m
_UNSUPPORTED = ("bias", "lora_bias", "modules_to_save", "layer_replication", "target_parameters",
                "trainable_token_indices", "use_qalora", "arrow_config")
# PEFT rewrote the base weight for these inits: their factors are relative to that rewritten base
_BASE_REWRITING_INITS = re.compile(r"pissa.*|olora|corda.*|loftq|lora_ga", re.IGNORECASE)


def _pattern(pattern: dict | None, name: str, default):
    for key, value in (pattern or {}).items():  # PEFT's rule: the key is a regex matching a suffix
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _kind_problem(layer: AdaptedLayer, dora: bool) -> str | None:
    norm, info = layer.normalizer, layer.slots.slot_info
    magnitude = [i for i in info.values() if i.role is Role.MAGNITUDE]
    if type(layer.slots) is not ParameterSlots or not isinstance(norm, Scale) or norm.learnable or layer.residual:
        return ("the model's adapter is not PEFT's LoRA (slots held as they are, the scale normalizer without a "
                "learnable scale, no residual initial update)")
    if bool(magnitude) != dora or any(i.exported_as != DORA_MAGNITUDE for i in magnitude):
        return f"use_dora={dora} but the model's adapter {'has no' if dora else 'has a'} DoRA magnitude"
    return None


def peft_source(path: Path, layers: dict[str, AdaptedLayer], model: nn.Module):
    """``{module: (rank, {state key: value})}`` from a PEFT LoRA/DoRA folder, checked."""
    where = f"hotswap {path}"
    config = loads_strict(read_regular_file(path / "adapter_config.json", 2**24), str(path / "adapter_config.json"))
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r}: hot-swap reads PEFT LoRA/DoRA folders")
    odd = {k: config[k] for k in _UNSUPPORTED if config.get(k) not in (None, False, "none", [], {})}
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and _BASE_REWRITING_INITS.fullmatch(init):
        odd["init_lora_weights"] = init  # relative to a base PEFT rewrote: wrong on this one
    if odd:
        raise AdapterError(f"{where}: these LoraConfig options are beyond B, A, alpha and DoRA's m: {odd}; "
                           "a swap cannot represent them: load the adapter with lorakit.transformers.import_peft")
    file = path / "adapter_model.safetensors"
    try:
        check_regular_file(file)
        tensors = load_file(str(file))
    except (FileNotFoundError, SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{where}: cannot read {file.name} ({exc}); save it with safe_serialization=True") from None
    dora = bool(config.get("use_dora"))
    names = {k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(PREFIX) and ".lora_" in k}
    if names != set(layers) or len(tensors) != len(names) * (3 if dora else 2):
        raise AdapterError(f"{where}: its targets differ (only in it: {sorted(names - set(layers))[:5]}, only in "
                           f"the model: {sorted(set(layers) - names)[:5]}; {len(tensors)} tensors for "
                           f"{len(names)} modules); a swap keeps the model's targets")
    out = {}
    for name, layer in layers.items():
        if (problem := _kind_problem(layer, dora)) is not None:
            raise AdapterError(f"{where}: module {name!r}: {problem}; the recipes differ: apply lora/rslora/dora")
        key_A, key_B = getattr(layer.kind, "peft_keys", ("lora_A.weight", "lora_B.weight"))
        get = {"A": f"{PREFIX}{name}.{key_A}", "B": f"{PREFIX}{name}.{key_B}",
               "magnitude": f"{PREFIX}{name}.{DORA_KEY}"}
        if dora and get["magnitude"] not in tensors:
            get["magnitude"] = get["magnitude"].removesuffix(".weight")  # older PEFT files
        if any(k not in tensors for k in get.values() if dora or not k.endswith(DORA_KEY)):
            raise AdapterError(f"{where}: module {name!r} lacks {sorted(k for k in get.values() if k not in tensors)}")
        A, B = tensors[get["A"]], tensors[get["B"]]
        r = A.shape[0]
        alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        s_peft = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        d = torch.full((r,), s_peft / layer.normalizer.initial_scale(r), dtype=torch.float64)
        by_role = {Role.A: A.reshape(r, -1), Role.B: B.reshape(B.shape[0], -1), Role.D: d,
                   Role.MAGNITUDE: tensors[get["magnitude"]].reshape(-1) if dora else None}
        values = {f"slots.{slot}": value.to(getattr(layer.slots, slot).dtype)
                  for slot, i in layer.slots.slot_info.items() if (value := by_role[i.role]) is not None}
        out[name] = (r, values)
    return out
