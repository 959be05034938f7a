"""Export any lorakit adapter as a standard PEFT LoRA/DoRA adapter (docs/design.md,
"Merge, unmerge, export").

The file pair PEFT writes, ``adapter_config.json`` + ``adapter_model.safetensors``,
loads unchanged with ``peft.PeftModel.from_pretrained`` and transformers'
``model.load_adapter``. The tensor layout and the ``LoraConfig`` are
``lorakit.core.peft_format`` (shared with the diffusers exporter) under the prefix
``base_model.model.``; this module adds the PEFT file pair and, for transformers'
``Conv1D`` (weight stored in × out), ``fan_in_fan_out`` — PEFT stores ``lora_A`` as
(r, in) and ``lora_B`` as (out, r) for it as for ``Linear``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lorakit.core import AdapterError, adapted_layers, adapter_config, extension
from lorakit.core.atomic import carry_over, publish, recover, staging_folder
from lorakit.core.experts import split_layer_names
from lorakit.core.peft_format import DORA_KEY, TRUNCATION_TOL, TruncationWarning, lora_config, lora_tensors
from lorakit.core.trained import PEFT_BIAS, saved_modules, trained_biases
from lorakit.core.validation import check_finite_tensors

#: this integration's namespace in the adapter's record (lorakit.core.set_extension)
EXTENSION = "transformers"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FORMATS = ("lora", "delora")  # export_peft(format=): PEFT's LoRA/DoRA, or its DeLoRA (delora_peft)
__all__ = ["DORA_KEY", "TRUNCATION_TOL", "PeftExport", "TruncationWarning", "export_peft", "lora_config",
           "peft_export", "peft_state_dict"]


@dataclass
class PeftExport:
    """A PEFT-format adapter in memory: ``tensors`` (PEFT key → tensor), ``config``
    (the ``LoraConfig`` fields as JSON) and ``rel_errors`` (module → relative
    Frobenius error of the exported update, 0 unless truncated)."""

    tensors: dict[str, Tensor]
    config: dict
    rel_errors: dict[str, float]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder ``path`` as one unit (``lorakit.core.atomic``, as a checkpoint's
        ``save``): a kill at any moment leaves the previous export there or this one, never
        new weights beside an old config. Other files in it (a README) are kept."""
        given = Path(path)
        path = Path(os.path.realpath(path))  # a symlinked folder is replaced where it points
        recover(path)  # an export killed mid-swap: reinstate it, so its other files carry over
        if os.path.lexists(path) and not path.is_dir():
            raise AdapterError(f"PEFT export: {given} is a file, not a folder; give a folder")
        folder = staging_folder(path)
        try:
            metadata = {"format": "pt", "lorakit_rel_errors": json.dumps(self.rel_errors, sort_keys=True)}
            save_file(self.tensors, str(folder / PEFT_WEIGHTS), metadata=metadata)
            (folder / PEFT_CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True))
            if path.is_dir():
                carry_over(path, folder, (PEFT_CONFIG, PEFT_WEIGHTS))
            publish(folder, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # gone already once published
        return given



def peft_export(model: nn.Module, rank: int | None = None, *, prefix: str = PEFT_PREFIX,
                base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                task_type: str | None = None, max_rank: int | str | None = None, energy: float = 0.999,
                fold_magnitude: bool = False) -> PeftExport:
    """The PEFT tensors and config of ``model``'s adapter, with per-module errors.

    By default every module's update is kept exactly (its numerical rank, ≤ 2r).
    ``max_rank=k`` truncates every module to rank ≤ k through the exact low-rank
    SVD; ``max_rank="auto"`` keeps, per module, the fewest directions holding
    ``energy`` of the update's energy (per-module ranks go into ``rank_pattern``).
    Either reports the relative error (a :class:`TruncationWarning` lists the
    modules that lost more than round-off). ``fold_magnitude=True`` writes a
    DoRA/OP-DoRA adapter as a plain LoRA of ``W_eff − W̄`` for clients without DoRA
    (vLLM, llama.cpp): exact at full rank. ``rank=k`` (older name) truncates to
    exactly k. ``dtype`` casts the saved tensors (default: the adapter's dtype).
    ``task_type`` (e.g. ``"CAUSAL_LM"``) is written to the config for PEFT's
    task-specific wrappers; the default None loads as a plain ``PeftModel``.
    """
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter to export; apply one first")
    warn_if_merged_base(model)
    tensors, ranks, use_dora, rel_errors = lora_tensors(model, rank, prefix=prefix, dtype=dtype, max_rank=max_rank,
                                                        energy=energy, fold_magnitude=fold_magnitude)
    tensors.update(_trained_base_tensors(model, prefix, dtype))
    check_finite_tensors(tensors.items(), "PEFT export refused")  # e.g. overflow when cast to fp16
    config = lora_config(ranks, use_dora=use_dora, fan_in_fan_out=any(m.kind.fan_in_fan_out for m in layers.values()),
                         base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                         dropout=max(layer.dropout for layer in layers.values()),
                         parameters=split_layer_names(layers)[1])  # fused expert tensors (target_parameters)
    config["bias"] = PEFT_BIAS[adapter_config(model).get("bias", "none")]
    config["modules_to_save"] = sorted(saved_modules(model)) or None
    return PeftExport(tensors, config, rel_errors)


def warn_if_merged_base(model: nn.Module) -> None:
    if merged := (extension(model, EXTENSION) or {}).get("merged_peft"):
        warnings.warn(f"this model's base has the PEFT adapter {merged} merged in "
                      "(import_peft with a recipe); the export is relative to that merged base, so load it "
                      "on a base with the same PEFT adapter merged", UserWarning, stacklevel=4)


def _trained_base_tensors(model: nn.Module, prefix: str, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The base tensors the adapter trained, under PEFT's names: an adapted module's
    bias is ``<module>.base_layer.bias`` inside PEFT's wrapper, any other keeps its name;
    a module to save is stored under its own name (PEFT drops ``modules_to_save.<adapter>``)."""
    named = {}
    for name, p in trained_biases(model).items():
        owner = name.removesuffix(".base.bias")
        named[f"{owner}.base_layer.bias" if owner != name else name] = p
    for name, module in saved_modules(model).items():
        named.update({f"{name}.{k}": v for k, v in module.trained.state_dict().items()})
    return {prefix + k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in named.items()}


def peft_state_dict(model: nn.Module, rank: int | None = None,
                    prefix: str = PEFT_PREFIX) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, lora_config_dict)`` in PEFT's schema; keys start with ``prefix``
    (``"base_model.model."`` for PEFT; diffusers uses e.g. ``"unet."``)."""
    export = peft_export(model, rank, prefix=prefix)
    return export.tensors, export.config


def export_peft(model: nn.Module, path: str | os.PathLike, *, max_rank: int | str | None = None,
                energy: float = 0.999, fold_magnitude: bool = False, rank: int | None = None,
                base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                task_type: str | None = None, format: str = "lora") -> Path:
    """Write ``model``'s adapter to ``path`` as a PEFT LoRA (or DoRA) adapter, or with
    ``format="delora"`` as PEFT's DeLoRA adapter (``delora_peft``: a DeLoRA adapter on
    ``nn.Linear`` modules, always exact; the truncation and folding options are LoRA's).

    Loads with ``PeftModel.from_pretrained(base, path)`` or ``base.load_adapter(path)``.
    Exact by default; ``max_rank=k`` (≤ k per module) or ``"auto"`` (the fewest
    directions holding ``energy``) truncate and warn with the per-module relative
    errors, which are also stored in the safetensors metadata (``lorakit_rel_errors``).
    ``fold_magnitude=True`` writes DoRA as plain LoRA (see :func:`peft_export`).
    ``rank=`` is the deprecated name of ``max_rank``. Returns ``path``.
    """
    if rank is not None:
        warnings.warn("export_peft(rank=) is deprecated; use max_rank=", DeprecationWarning, stacklevel=2)
        max_rank, rank = (rank if max_rank is None else max_rank), None
    if format not in FORMATS:
        raise AdapterError(f"export_peft(format={format!r}): use one of {FORMATS}")
    if format == "delora":
        if max_rank is not None or fold_magnitude:
            raise AdapterError("export_peft(format='delora') writes the update exactly; max_rank= and "
                               "fold_magnitude= apply to format='lora'")
        from .delora_peft import delora_export
        return delora_export(model, base_model_name_or_path=base_model_name_or_path, dtype=dtype,
                             task_type=task_type).save(path)
    export = peft_export(model, base_model_name_or_path=base_model_name_or_path, dtype=dtype,
                         task_type=task_type, max_rank=max_rank, energy=energy, fold_magnitude=fold_magnitude)
    return export.save(path)
