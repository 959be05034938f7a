"""Import a PEFT LoRA or DoRA adapter into lorakit to keep training it.

PEFT's update for a module is ``ΔW = s · B A`` with ``s = alpha/r`` (``alpha/√r``
with ``use_rslora``), ``alpha`` and ``r`` per module from ``alpha_pattern`` /
``rank_pattern``; DoRA adds ``W_eff = diag(m / ‖W̄ + ΔW‖_row) (W̄ + ΔW)``.

Two semantics, both starting exactly at the PEFT model's function:

- ``recipe=None`` — *continue the same adapter*: lorakit builds the adapter PEFT
  trained (``direct`` generator, ``scale`` normalizer with PEFT's alpha/rsLoRA,
  ``dora`` magnitude if ``use_dora``) and loads ``B``, ``A`` (and ``m``) from the
  file. The parameterization is PEFT's, so a training step is PEFT's step, and an
  export writes the same update back. A per-module ``alpha_pattern`` is folded into
  ``B`` (the value is exact; only that module's learning-rate scale changes).
- ``recipe=Adapter(...)`` (or a recipe name) — *train another method on top*: the
  PEFT update is merged into the base weights (in fp32, cast back, as PEFT's
  ``merge_and_unload``) and the recipe is applied to the same modules; every
  lorakit adapter is the identity at step 0, so the model starts at the PEFT
  model's function. The new adapter (its native checkpoints and exports) is
  relative to that merged base: rebuild it with ``import_peft(base, path, recipe)``
  before ``lorakit.core.load``, or ship ``merge_and_unload(model)``.

Anything the file holds that lorakit cannot represent (biases, ``modules_to_save``,
embedding LoRA, other PEFT methods) is a clear error listing it; nothing changes.
Fused expert tensors (PEFT's ``target_parameters``) import per expert (``peft_experts``).
So is an adapter whose ``init_lora_weights`` (pissa*, olora, corda, loftq, lora_ga)
made PEFT rewrite the base weights: its factors only make sense on that rewritten
base, and the error says how to convert it with PEFT first.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from lorakit.core import Adapter, AdapterError, Role, adapted_layers, registry, set_extension
from lorakit.core.checkpoint import MAX_CONFIG_BYTES
from lorakit.core.lora import Direct, Kaiming, Scale
from lorakit.core.peft_format import most_common_rank
from lorakit.core.validation import loads_strict, read_regular_file
from lorakit.magnitudes import DoRA

from .peft_experts import expert_updates
from .peft_writer import EXTENSION, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS

_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)")
# LoraConfig fields that change what the adapter computes, with the value lorakit supports.
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "modules_to_save": None, "layer_replication": None,
                "trainable_token_indices": None, "alora_invocation_tokens": None,
                "use_qalora": False, "use_bdlora": None, "arrow_config": None}
# init_lora_weights values for which PEFT rewrote the base weight (W_res = W̄ − B0 A0, or
# LoftQ's quantized residual) and saved A, B relative to that residual: importing them
# as a LoRA on the original W̄ would silently add B0 A0 back. EVA, MiCA, "gaussian" and
# "orthogonal" leave the base untouched and import as they are.
_BASE_REWRITING_INITS = re.compile(r"pissa.*|olora|corda.*|loftq|lora_ga", re.IGNORECASE)
PEFT_TYPES = ("LORA", "DELORA")  # DeLoRA: delora_peft


class PeftImportError(AdapterError):
    """A PEFT adapter lorakit cannot import; the model is unchanged."""


def _pattern_value(pattern: dict, name: str, default: Any) -> Any:
    # PEFT's rule (peft.utils.other.get_pattern_key): the key is a regex matching a suffix.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_config(path: str | os.PathLike) -> dict:
    """``adapter_config.json`` of a PEFT adapter folder, read strictly (untrusted input: no NaN,
    duplicate keys, huge numbers; a bounded regular file)."""
    path = Path(path)
    try:
        config = loads_strict(read_regular_file(path / PEFT_CONFIG, MAX_CONFIG_BYTES, PeftImportError),
                              str(path / PEFT_CONFIG), PeftImportError)
    except FileNotFoundError:
        raise PeftImportError(f"{path / PEFT_CONFIG} not found; is {path} a PEFT adapter folder?") from None
    if not isinstance(config, dict) or config.get("peft_type") not in PEFT_TYPES:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise PeftImportError(f"{path}: peft_type {kind!r} is not supported; lorakit imports LoRA and DoRA "
                              "adapters (peft_type 'LORA') and DeLoRA adapters ('DELORA')")
    return config


def load_weights(path: str | os.PathLike) -> tuple[Path, dict[str, Tensor]]:
    """``(file, tensors)`` of the folder's ``adapter_model.safetensors``; one error if absent or corrupt."""
    weights = Path(path) / PEFT_WEIGHTS
    if not weights.is_file():
        extra = " (only a pickled adapter_model.bin is there; lorakit reads safetensors only: re-save it " \
                "with PeftModel.save_pretrained(..., safe_serialization=True))" \
            if (Path(path) / "adapter_model.bin").is_file() else ""
        raise PeftImportError(f"{weights} not found{extra}")
    try:
        return weights, load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PeftImportError(f"{weights} is truncated or corrupt ({exc})") from None


def group_by_module(tensors: dict[str, Tensor], prefix: str, key: re.Pattern, part=None, default=None
                    ) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """``({module: {part: tensor}}, unknown keys)`` for the keys ``prefix + <module>.<part>``
    that ``key`` (groups ``module``, ``part``) matches; ``part(name, default)`` renames a part."""
    modules: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for name, value in tensors.items():
        match = key.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if match is None:
            unknown.append(name)
            continue
        label = match["part"] if part is None else part(match["part"], default)
        modules.setdefault(match["module"], {})[label] = value
    return modules, unknown


def read_peft(path: str | os.PathLike, prefix: str = PEFT_PREFIX) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """``(config, {module: {"A", "B"[, "m"]}})`` from a PEFT LoRA/DoRA adapter folder, validated."""
    path = Path(path)
    config = read_config(path)
    if config["peft_type"] != "LORA":
        raise PeftImportError(f"{path}: peft_type {config['peft_type']!r}: read_peft reads LoRA and DoRA "
                              "adapters; import_peft imports it")
    odd = {k: config[k] for k, ok in _UNSUPPORTED.items()
           if k in config and config[k] != ok and config[k] not in (None, [], {})}
    if odd:
        raise PeftImportError(f"{path}: these LoraConfig options have no lorakit equivalent: {odd}; "
                              "retrain without them or merge the adapter with PEFT instead")
    if config.get("use_dora") and config.get("target_parameters"):
        raise PeftImportError(f"{path}: use_dora with target_parameters: PEFT has no DoRA for parameters, so "
                              "this file cannot come from PEFT; export it again without use_dora")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and _BASE_REWRITING_INITS.fullmatch(init):
        raise PeftImportError(
            f"{path}: init_lora_weights={init!r}: PEFT rewrote the base weights when it created this adapter, "
            "so its lora_A/lora_B are relative to that modified base and would give wrong outputs on the "
            "original model. Fix: in PEFT, save it converted to a plain LoRA on the original base, "
            "peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=<folder saved right "
            "after get_peft_model, before training>) (pissa/olora/corda/lora_ga), or load it in PEFT on the "
            "base it was made for and use merge_and_unload()'s model as the base to import into")
    weights, tensors = load_weights(path)

    modules, unknown = group_by_module(tensors, prefix, _KEY,
                                       {"lora_A.weight": "A", "lora_B.weight": "B"}.get, default="m")
    if unknown:
        shown = ", ".join(sorted(unknown)[:12]) + (f" and {len(unknown) - 12} more" if len(unknown) > 12 else "")
        raise PeftImportError(
            f"{weights}: {len(unknown)} keys lorakit does not understand: {shown}. lorakit imports "
            f"'{prefix}<module>.lora_A.weight', '.lora_B.weight' and DoRA's '.lora_magnitude_vector'")
    dora = bool(config.get("use_dora"))
    for name, parts in sorted(modules.items()):
        need = {"A", "B", "m"} if dora else {"A", "B"}
        if set(parts) != need:
            raise PeftImportError(f"{weights}: module {name!r} has {sorted(parts)}, expected {sorted(need)} "
                                  f"(use_dora={dora})")
    if not modules:
        raise PeftImportError(f"{weights} holds no LoRA tensors")
    return config, modules


def _peft_update(config: dict, name: str, parts: dict[str, Tensor], layer_kind, base: nn.Module):
    """``(B·s, A, m)`` as out × r, r × in matrices in fp32, shape-checked against ``base``."""
    W = layer_kind.matrix(base)
    out_f, in_f = W.shape
    # Conv2d LoRA is stored (r, in, kh, kw) and (out, r, 1, 1): flatten to the matrix view.
    A, B = parts["A"].flatten(1).to(W.device, torch.float32), parts["B"].flatten(1).to(W.device, torch.float32)
    r = A.shape[0]
    if A.shape[1] != in_f or B.shape != (out_f, r):
        raise PeftImportError(f"module {name!r} is {out_f}x{in_f} but the file's lora_B @ lora_A is "
                              f"{tuple(B.shape)} @ {tuple(A.shape)}; the adapter was made for another model")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    s = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    m = parts.get("m")
    if m is not None and m.shape != (out_f,):
        raise PeftImportError(f"module {name!r}: lora_magnitude_vector has shape {tuple(m.shape)}, "
                              f"expected ({out_f},)")
    return B * s, A, None if m is None else m.to(W.device, torch.float32)


def import_peft(model: nn.Module, path: str | os.PathLike, recipe: Adapter | str | None = None, *,
                prefix: str = PEFT_PREFIX) -> nn.Module:
    """Load the PEFT LoRA/DoRA adapter at ``path`` into ``model`` (a plain base model)
    as a lorakit adapter and return ``model``; see the module docstring for the two
    semantics (``recipe=None``: keep training the same adapter; a recipe: train it on
    top of the merged PEFT update). A PEFT DeLoRA folder imports as lorakit's DeLoRA
    (``delora_peft``). On any error the model is unchanged."""
    if (config := read_config(path))["peft_type"] == "DELORA":
        from .delora_peft import import_delora
        return import_delora(model, path, config, recipe, prefix=prefix)
    config, modules = read_peft(path, prefix)
    if adapted_layers(model):
        raise PeftImportError(f"{type(model).__name__} already has a lorakit adapter; import into the base "
                              "model (lorakit.core.unload(model) first)")
    experts, bases, modules, parameters = expert_updates(model, config, modules, path, _peft_update,
                                                         _pattern_value, PeftImportError)  # target_parameters
    names = dict(model.named_modules())
    missing = sorted(set(modules) - set(names))
    if missing:
        raise PeftImportError(f"{path}: modules {missing[:8]} are not in {type(model).__name__}; "
                              "the adapter was made for another architecture")
    updates = {}
    for name, parts in modules.items():
        kind = registry.layer_kind(names[name])
        if kind is None:
            raise PeftImportError(f"module {name!r} is a {type(names[name]).__name__}, which lorakit cannot adapt")
        updates[name] = (kind, _peft_update(config, name, parts, kind, names[name]))
        bases[name] = names[name]
    updates.update(experts)
    targets = "(?:" + "|".join(re.escape(n) for n in sorted(modules)) + ")" if modules else None
    if recipe is None:
        return _continue_same_adapter(model, config, updates, targets, parameters)
    adapter = Adapter.from_recipe(recipe) if isinstance(recipe, str) else recipe
    return merge_then_apply(model, updates, adapter, targets, path, bases, parameters)


def _continue_same_adapter(model, config, updates, targets, parameters=None):
    ranks = {name: A.shape[0] for name, (_, (_, A, _)) in updates.items()}
    r = most_common_rank(ranks)
    adapter = Adapter(generator=Direct(), normalizer=Scale(alpha=config.get("lora_alpha", 8),
                                                           rs=bool(config.get("use_rslora"))),
                      init=Kaiming(), magnitude=DoRA() if config.get("use_dora") else None,
                      rank=r, rank_pattern={n: k for n, k in ranks.items() if k != r})
    adapter.apply(model, targets=targets, target_parameters=parameters)
    layers = adapted_layers(model)
    with torch.no_grad():
        for name, (_, (Bs, A, m)) in updates.items():
            layer = layers[name]
            s = layer.normalizer.initial_scale(layer.rank)  # lorakit's alpha/r; PEFT's may differ per module
            params = layer.slots.parameters_by_slot()  # Direct: one parameter per trainable slot
            values = {Role.A: A, Role.B: Bs / s, Role.MAGNITUDE: m}
            for role, value in values.items():
                if value is not None:
                    params[layer.slots.names_with(role)[0]].copy_(value)
    return model


def merge_then_apply(model, updates, adapter, targets, path, bases=None, parameters=None):
    """Merge each PEFT update into its base matrix (``bases[name]``, else the module ``name``),
    then apply ``adapter``; on error every matrix is restored."""
    bases = {name: model.get_submodule(name) if bases is None or name not in bases else bases[name]
             for name in updates}
    saved = {}
    try:
        with torch.no_grad():
            for name, (kind, (Bs, A, m)) in updates.items():
                base = bases[name]
                W = kind.matrix(base)
                saved[name] = W.detach().clone()
                V = W.float() + Bs @ A
                if m is not None:  # DoRA: W_eff = diag(m / ‖V_i‖) V
                    V = V * (m / V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny))[:, None]
                kind.set_matrix(base, V.to(W.dtype))
        adapter.apply(model, targets=targets, target_parameters=parameters)
    except Exception:
        with torch.no_grad():
            for name, W in saved.items():
                kind = updates[name][0]
                kind.set_matrix(bases[name], W)
        raise
    # export_peft warns: the base is no longer the pretrained one
    set_extension(model, EXTENSION, {"merged_peft": str(path)})
    return model
