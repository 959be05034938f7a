"""Export an adapted diffusers model to diffusers' LoRA format (docs/design.md,
"Merge, unmerge, export").

One file, ``pytorch_lora_weights.safetensors``, that ``model.load_lora_adapter(...)``
and ``pipeline.load_lora_weights(...)`` load unchanged:

- keys ``{prefix}.{module}.lora_A.weight`` / ``.lora_B.weight`` (PEFT's schema under
  the pipeline component's prefix, ``unet`` or ``transformer``), and
  ``{prefix}.{module}.lora_magnitude_vector.weight`` for DoRA (the layout is
  ``lorakit.core.peft_format``, shared with the PEFT exporter);
- ``W_eff − W̄ = B A`` exactly (core's ``export_factors``: the residualized update
  of any recipe reduced to its true rank), so ``lora_alpha = r`` (scale 1) and the
  factors carry everything; per-module ranks go into ``rank_pattern`` and, with the
  same values, ``alpha_pattern``;
- the ``LoraConfig`` arguments under the safetensors metadata key
  ``lora_adapter_metadata`` as JSON with ``{prefix}.``-prefixed top-level keys —
  what diffusers' ``save_lora_adapter`` writes and ``load_lora_adapter`` reads back
  (diffusers >= 0.34); without it diffusers would guess alpha from the shapes.

``nn.Conv2d`` targets: ``A`` (k × in·kh·kw) becomes the k-channel conv with the
base kernel, ``B`` a 1×1 conv, as PEFT builds them. DoRA: PEFT's DoRA is
``W_eff = m / ‖W̄ + BA‖_row ⊙ (W̄ + BA)``, the same as lorakit's magnitude head, so
the magnitude is written as is (shape ``(1, out, 1, 1)`` for convolutions).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lorakit.core import AdapterError, adapter_config
from lorakit.core.atomic import atomic_write
from lorakit.core.peft_format import check_exportable, check_no_trained_base, lora_config, lora_tensors
from lorakit.core.validation import check_finite_tensors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclass
class DiffusersExport:
    """What :func:`export_diffusers` wrote."""

    path: Path
    prefix: str
    rank: int
    rank_pattern: dict[str, int] = field(default_factory=dict)
    use_dora: bool = False
    rel_error: dict[str, float] = field(default_factory=dict)

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error.values(), default=0.0)


def default_prefix(model: nn.Module) -> str:
    """``unet`` for UNets, ``transformer`` otherwise (the pipelines' component names)."""
    return "unet" if type(model).__name__.startswith("UNet") else "transformer"


def diffusers_state_dict(model: nn.Module, prefix: str | None = None, rank: int | None = None,
                         dtype: torch.dtype | None = None,
                         **options) -> tuple[dict[str, Tensor], dict, dict[str, float]]:
    """``(tensors, lora_config, rel_error)``: the file's tensors (PEFT's layout,
    ``lorakit.core.peft_format``, under ``{prefix}.``), the ``LoraConfig`` arguments
    diffusers reads, and each module's relative truncation error. ``options``:
    ``max_rank``, ``energy``, ``fold_magnitude`` (``lorakit.core.peft_format.lora_tensors``)."""
    prefix = default_prefix(model) if prefix is None else prefix
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise AdapterError(f"prefix {prefix!r}: give the pipeline component's name, e.g. 'unet' or 'transformer'")
    check_exportable(model, "diffusers", "diffusers")
    check_no_trained_base(model, "diffusers")
    tensors, ranks, use_dora, rel_error = lora_tensors(model, rank, prefix=f"{prefix}.", dtype=dtype, **options)
    check_finite_tensors(tensors.items(), "diffusers export refused")  # e.g. overflow when cast to fp16
    return tensors, lora_config(ranks, use_dora=use_dora), rel_error


def export_diffusers(model: nn.Module, path: str | os.PathLike, prefix: str | None = None,
                     rank: int | None = None, *, max_rank: int | str | None = None, energy: float = 0.999,
                     fold_magnitude: bool = False, dtype: torch.dtype | None = None,
                     weight_name: str = WEIGHT_NAME) -> DiffusersExport:
    """Write ``path/pytorch_lora_weights.safetensors`` for diffusers.

    ``prefix``: the pipeline component the model is (``"unet"``, ``"transformer"``;
    default from the class name). By default each module's exact update is written;
    ``max_rank=k`` truncates every module to rank ≤ k, ``max_rank="auto"`` to the
    fewest directions holding ``energy`` of its update, and warns with the relative
    error lost (a ``TruncationWarning``; also in the returned report and the file's
    ``lorakit_rel_errors`` metadata). ``fold_magnitude=True`` writes DoRA as plain
    LoRA (exact at full rank). ``rank`` is the deprecated name of ``max_rank``.
    ``dtype`` casts the saved tensors.

        export_diffusers(unet, "out/", prefix="unet")
        pipe.load_lora_weights("out/", weight_name=WEIGHT_NAME)
        unet.load_lora_adapter("out/", prefix="unet", weight_name=WEIGHT_NAME)
    """
    prefix = default_prefix(model) if prefix is None else prefix
    if rank is not None:
        warnings.warn("export_diffusers(rank=) is deprecated; use max_rank=", DeprecationWarning, stacklevel=2)
        max_rank = rank if max_rank is None else max_rank
    tensors, config, rel_error = diffusers_state_dict(model, prefix, None, dtype, max_rank=max_rank, energy=energy,
                                                      fold_magnitude=fold_magnitude)
    if not hasattr(model, "load_lora_adapter"):
        warnings.warn(
            f"diffusers has no LoRA loader for {type(model).__name__}; the file is written, and "
            "peft.inject_adapter_in_model + set_peft_model_state_dict load it (keys without the prefix)",
            stacklevel=2,
        )
    lorakit = adapter_config(model)
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True),
        "lorakit": json.dumps({k: lorakit.get(k) for k in ("recipe", "generator", "normalizer", "init",
                                                           "magnitude", "rank")}, sort_keys=True),
        "lorakit_rel_errors": json.dumps(rel_error, sort_keys=True),
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / weight_name
    atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    ranks = {n: tensors[f"{prefix}.{n}.lora_A.weight"].shape[0] for n in config["target_modules"]}
    return DiffusersExport(target, prefix, config["r"], {n: k for n, k in ranks.items() if k != config["r"]},
                           config["use_dora"], rel_error)
