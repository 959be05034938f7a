"""Export any lorakit adapter as a standard PEFT LoRA/DoRA adapter (DESIGN §3, Export).

The file pair PEFT writes, ``adapter_config.json`` + ``adapter_model.safetensors``,
loads unchanged with ``peft.PeftModel.from_pretrained`` and transformers'
``model.load_adapter``. For each adapted module ``<name>``:

    base_model.model.<name>.lora_A.weight          (r × in)
    base_model.model.<name>.lora_B.weight          (out × r)
    base_model.model.<name>.lora_magnitude_vector.weight  (out,)   DoRA heads only

The factors are ``lorakit.core.export_factors``: the whole update ``W_eff − W̄``
(residual terms of PiSSA/DeLoRA/LoLDU folded in, OP-LoRA's MLP evaluated once and
discarded) reduced exactly with a QR + small SVD. ``lora_alpha`` equals each
module's rank, so PEFT's scaling ``alpha/r`` is 1 and the factors carry everything;
modules whose rank differs from the most common one go to ``rank_pattern`` /
``alpha_pattern``. PEFT stores ``lora_A`` as (r, in) and ``lora_B`` as (out, r) for
every layer type, transformers' ``Conv1D`` (weight stored in × out) included; only
``fan_in_fan_out`` in the config tells PEFT how to read the base weight.

The DoRA magnitude is written under the name of PEFT's parameter,
``lora_magnitude_vector.weight`` (``DoraLinearLayer.weight``). PEFT itself saves it
without ``.weight`` and re-appends the suffix when loading, but transformers'
``load_adapter`` (5.x) maps only ``lora_*`` → ``lora_*.default`` and then misses the
suffix; with the suffix in the file both loaders place it correctly.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lorakit.core import AdapterError, adapted_layers, export_factors

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DORA_KEY = "lora_magnitude_vector.weight"
# Relative error above which a truncated export is reported (fp32 round-off is ~1e-7).
TRUNCATION_TOL = 1e-6


class TruncationWarning(UserWarning):
    """An export at a rank lower than the update's rank lost part of the update."""


@dataclass
class PeftExport:
    """A PEFT-format adapter in memory: ``tensors`` (PEFT key → tensor), ``config``
    (the ``LoraConfig`` fields as JSON) and ``rel_errors`` (module → relative
    Frobenius error of the exported update, 0 unless truncated)."""

    tensors: dict[str, Tensor]
    config: dict
    rel_errors: dict[str, float]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt", "lorakit_rel_errors": json.dumps(self.rel_errors, sort_keys=True)}
        _atomic(path / PEFT_WEIGHTS, lambda p: save_file(self.tensors, str(p), metadata=metadata))
        _atomic(path / PEFT_CONFIG, lambda p: p.write_text(json.dumps(self.config, indent=2, sort_keys=True)))
        return path


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _uses_conv1d(layer: nn.Module) -> bool:
    # transformers' Conv1D stores its weight in × out: PEFT reads it with fan_in_fan_out.
    return type(layer.base).__name__ == "Conv1D"


def peft_export(model: nn.Module, rank: int | None = None, *, prefix: str = PEFT_PREFIX,
                base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                task_type: str | None = None) -> PeftExport:
    """The PEFT tensors and config of ``model``'s adapter, with per-module errors.

    ``rank=None`` keeps every module's update exactly (its numerical rank, ≤ 2r);
    an explicit ``rank`` truncates every module to it and reports the relative
    error (a :class:`TruncationWarning` lists the modules that lost more than
    round-off). ``dtype`` casts the saved tensors (default: the adapter's dtype).
    ``task_type`` (e.g. ``"CAUSAL_LM"``) is written to the config for PEFT's
    task-specific wrappers; the default None loads as a plain ``PeftModel``.
    """
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter to export; apply one first")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise AdapterError(f"export rank={rank!r}: give an integer >= 1, or None to export exactly")
    if getattr(model, "lorakit_merged_peft", None):
        warnings.warn(f"this model's base has the PEFT adapter {model.lorakit_merged_peft} merged in "
                      "(import_peft with a recipe); the export is relative to that merged base, so load it "
                      "on a base with the same PEFT adapter merged", UserWarning, stacklevel=3)
    factors = export_factors(model, rank)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for name, f in factors.items():
        cast = (lambda t: t.cpu()) if dtype is None else (lambda t: t.to("cpu", dtype))
        tensors[f"{prefix}{name}.lora_A.weight"] = cast(f.A).contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = cast(f.B).contiguous()
        if f.magnitude is not None:
            tensors[f"{prefix}{name}.{DORA_KEY}"] = cast(f.magnitude).contiguous()
        ranks[name] = f.A.shape[0]
    magnitudes = {f.magnitude is not None for f in factors.values()}
    if len(magnitudes) > 1:
        raise AdapterError("PEFT has one use_dora flag per adapter, but only some modules of this model "
                           "have a magnitude head; export them as two adapters")
    rel_errors = {name: f.rel_error for name, f in factors.items()}
    lost = {n: e for n, e in rel_errors.items() if e > TRUNCATION_TOL}
    if lost:
        worst = ", ".join(f"{n}: {e:.3g}" for n, e in sorted(lost.items(), key=lambda kv: -kv[1])[:8])
        warnings.warn(
            f"export at rank {rank} truncated {len(lost)} of {len(rel_errors)} modules; relative error "
            f"‖ΔW − ΔW_r‖/‖ΔW‖ (largest first): {worst}. Export with rank=None to keep the update exactly.",
            TruncationWarning, stacklevel=3)
    return PeftExport(tensors, lora_config(ranks, use_dora=magnitudes == {True},
                                           fan_in_fan_out=any(_uses_conv1d(m) for m in layers.values()),
                                           base_model_name_or_path=base_model_name_or_path,
                                           task_type=task_type), rel_errors)


def lora_config(ranks: dict[str, int], *, use_dora: bool = False, fan_in_fan_out: bool = False,
                base_model_name_or_path: str | None = None, task_type: str | None = None) -> dict:
    """A PEFT ``LoraConfig`` (as JSON) whose scaling is 1 for every module.

    ``r`` is the most common rank; other modules get ``rank_pattern`` and
    ``alpha_pattern`` entries keyed by their escaped full name, which PEFT matches
    with ``re.match(r"(.*\\.)?(key)$", name)``. ``target_modules`` lists full names
    so exactly the exported modules are adapted.
    """
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(name): k for name, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "use_dora": use_dora,
        "use_rslora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def peft_state_dict(model: nn.Module, rank: int | None = None,
                    prefix: str = PEFT_PREFIX) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, lora_config_dict)`` in PEFT's schema; keys start with ``prefix``
    (``"base_model.model."`` for PEFT; diffusers uses e.g. ``"unet."``)."""
    export = peft_export(model, rank, prefix=prefix)
    return export.tensors, export.config


def export_peft(model: nn.Module, path: str | os.PathLike, *, rank: int | None = None,
                base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                task_type: str | None = None) -> Path:
    """Write ``model``'s adapter to ``path`` as a PEFT LoRA (or DoRA) adapter.

    Loads with ``PeftModel.from_pretrained(base, path)`` or ``base.load_adapter(path)``.
    ``rank=None`` is exact; an explicit ``rank`` truncates and warns with the
    per-module relative errors, which are also stored in the safetensors metadata
    (``lorakit_rel_errors``). Returns ``path``.
    """
    export = peft_export(model, rank, base_model_name_or_path=base_model_name_or_path, dtype=dtype,
                         task_type=task_type)
    return export.save(path)
