"""Export an adapted diffusers model to diffusers' LoRA format (DESIGN §3, Export).

One file, ``pytorch_lora_weights.safetensors``, that ``model.load_lora_adapter(...)``
and ``pipeline.load_lora_weights(...)`` load unchanged:

- keys ``{prefix}.{module}.lora_A.weight`` / ``.lora_B.weight`` (PEFT's schema under
  the pipeline component's prefix, ``unet`` or ``transformer``), and
  ``{prefix}.{module}.lora_magnitude_vector`` for DoRA;
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
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lorakit.core import AdapterError, adapted_layers, export_factors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
TRUNCATION_WARN = 1e-6  # a truncated export losing more than this (relative) is reported


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


def _layer_tensors(name: str, base: nn.Module, B: Tensor, A: Tensor, m: Tensor | None) -> dict[str, Tensor]:
    if isinstance(base, nn.Conv2d):
        if base.groups != 1 or tuple(base.dilation) != (1, 1):
            # PEFT builds lora_A without dilation and lora_B with the base's groups.
            raise AdapterError(
                f"module {name!r}: a Conv2d with dilation {base.dilation} / groups {base.groups} "
                "has no diffusers LoRA equivalent; leave it out of the targets"
            )
        A = A.reshape(A.shape[0], *base.weight.shape[1:])
        B = B[:, :, None, None]
        m = None if m is None else m.reshape(1, -1, 1, 1)
    elif not isinstance(base, nn.Linear):
        raise AdapterError(
            f"module {name!r} is a {type(base).__name__}; the diffusers LoRA format holds "
            "nn.Linear and nn.Conv2d layers only. Leave it out of the targets."
        )
    out = {f"{name}.lora_A.weight": A, f"{name}.lora_B.weight": B}
    if m is not None:
        out[f"{name}.lora_magnitude_vector"] = m
    return out


def diffusers_state_dict(model: nn.Module, prefix: str | None = None, rank: int | None = None,
                         dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict, dict[str, float]]:
    """``(tensors, lora_config, rel_error)``: the file's tensors, the ``LoraConfig``
    arguments diffusers reads, and each module's relative truncation error."""
    prefix = default_prefix(model) if prefix is None else prefix
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise AdapterError(f"prefix {prefix!r}: give the pipeline component's name, e.g. 'unet' or 'transformer'")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise AdapterError(f"rank={rank!r}: give an integer >= 1, or None for the exact rank")
    bases = {n: layer.base for n, layer in adapted_layers(model).items()}
    exported = export_factors(model, rank)  # raises if there is no adapter, or it is merged/disabled
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for name, e in exported.items():
        layer = _layer_tensors(name, bases[name], e.B, e.A, e.magnitude)
        tensors.update({f"{prefix}.{k}": v.to("cpu", dtype or v.dtype).contiguous() for k, v in layer.items()})
        ranks[name] = e.A.shape[0]
    dora = {e.magnitude is not None for e in exported.values()}
    if len(dora) > 1:
        raise AdapterError("some adapted modules have a magnitude head and others not; "
                           "the diffusers format needs one LoraConfig for all")
    r = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches a pattern key with `(.*\.)?(key)$`; `^` + the escaped full name
    # hits exactly that module (as diffusers' own keys do), never a longer name.
    pattern = {"^" + re.escape(name): k for name, k in ranks.items() if k != r}
    config = {
        "r": r,
        "lora_alpha": r,  # scale alpha/r = 1: the factors are the whole update
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "use_dora": dora.pop(),
        "lora_dropout": 0.0,
        "bias": "none",
    }
    return tensors, config, {n: e.rel_error for n, e in exported.items()}


def export_diffusers(model: nn.Module, path: str | os.PathLike, prefix: str | None = None,
                     rank: int | None = None, *, dtype: torch.dtype | None = None,
                     weight_name: str = WEIGHT_NAME) -> DiffusersExport:
    """Write ``path/pytorch_lora_weights.safetensors`` for diffusers.

    ``prefix``: the pipeline component the model is (``"unet"``, ``"transformer"``;
    default from the class name). ``rank=None`` writes each module's exact update;
    an integer truncates every module to that rank and warns with the relative error
    lost (also in the returned report). ``dtype`` casts the saved tensors.

        export_diffusers(unet, "out/", prefix="unet")
        pipe.load_lora_weights("out/", weight_name=WEIGHT_NAME)
        unet.load_lora_adapter("out/", prefix="unet", weight_name=WEIGHT_NAME)
    """
    prefix = default_prefix(model) if prefix is None else prefix
    tensors, config, rel_error = diffusers_state_dict(model, prefix, rank, dtype)
    if not hasattr(model, "load_lora_adapter"):
        warnings.warn(
            f"diffusers has no LoRA loader for {type(model).__name__}; the file is written, and "
            "peft.inject_adapter_in_model + set_peft_model_state_dict load it (keys without the prefix)",
            stacklevel=2,
        )
    worst = max(rel_error, key=rel_error.get)
    if rank is not None and rel_error[worst] > TRUNCATION_WARN:
        warnings.warn(
            f"diffusers export at rank {rank} is approximate: relative error up to "
            f"{rel_error[worst]:.3g} (module {worst!r}); pass rank=None for an exact export",
            stacklevel=2,
        )
    lorakit = getattr(model, "lorakit_config", {}) or {}
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True),
        "lorakit": json.dumps({k: lorakit.get(k) for k in ("recipe", "generator", "normalizer", "init",
                                                           "magnitude", "rank")}, sort_keys=True),
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / weight_name
    # Write then rename: an interrupted export never leaves a truncated file behind.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{weight_name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    ranks = {n: tensors[f"{prefix}.{n}.lora_A.weight"].shape[0] for n in config["target_modules"]}
    return DiffusersExport(target, prefix, config["r"], {n: k for n, k in ranks.items() if k != config["r"]},
                           config["use_dora"], rel_error)
