"""Export to the kohya-ss / A1111 / ComfyUI LoRA file: the format the
Stable Diffusion community shares, which diffusers reads with
``pipeline.load_lora_weights(file)`` (``lora_conversion_utils._convert_non_diffusers_lora_to_diffusers``).

One ``.safetensors`` file; for each adapted module ``<name>`` of a component:

    lora_<component>_<name with . → _>.lora_down.weight   (k × in), a k-channel conv for Conv2d
    lora_<component>_<name with . → _>.lora_up.weight     (out × k), a 1×1 conv for Conv2d
    lora_<component>_<name with . → _>.alpha              scalar k: scale alpha/k = 1

k is one rank per component: every module is zero-padded to the component's
largest rank (exact: the extra rows of ``lora_down`` and columns of ``lora_up`` are
0). Diffusers' reader needs it: it turns the per-module alphas into one
``lora_alpha`` (the most common) plus an ``alpha_pattern`` whose keys for attention
projections (``…attn1.processor.to_q_lora.down.weight`` in a UNet, the block
``…self_attn`` in a text encoder) match no PEFT module, so such a module of another
rank would be scaled by ``alpha_common / k_module`` ≠ 1. kohya-ss' ``networks/lora.py``
and ComfyUI's ``comfy/weight_adapter/lora.py`` scale each module by ``alpha /
lora_down.shape[0]`` and read the padded file identically.

``<component>`` is ``unet`` for a UNet, ``te`` for the text encoder (``te1`` / ``te2``
when SDXL's second encoder is exported too). kohya-ss trains SD 1.x/2.x on
diffusers' own UNet and module names, so the names are the diffusers ones; SDXL
files with diffusers names are read the same way (diffusers and ComfyUI map both
spellings). The factors are core's exact ``W_eff − W̄`` (``peft_format.lora_tensors``).

DoRA: the format's ``dora_scale`` is dropped by diffusers' reader and means
different things to different clients, so a magnitude head is always folded
(``fold_magnitude``: the plain LoRA of ``W_eff − W̄``, exact at full rank).
DiT transformers (SD3, Flux, …) have community formats keyed by their original
(non-diffusers) module names; they are refused here: use :func:`export_diffusers`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lorakit.core import AdapterError, adapter_config
from lorakit.core.atomic import atomic_write
from lorakit.core.peft_format import check_exportable, check_no_trained_base, lora_tensors
from lorakit.core.validation import check_finite_tensors

KOHYA_NAME = "lora.safetensors"  # the file written when ``path`` is a folder


def component_prefix(model: nn.Module, second_encoder: bool = False) -> str:
    """``lora_unet``, ``lora_te`` (``lora_te1`` / ``lora_te2`` with SDXL's two encoders)."""
    name = type(model).__name__
    if name.startswith("UNet2DCondition"):
        return "lora_unet"
    if name.startswith("CLIPTextModel"):
        return "lora_te"
    raise AdapterError(f"{name}: the kohya format holds a Stable Diffusion UNet (UNet2DConditionModel) and its "
                       "CLIP text encoders; export other models with export_diffusers")


def pad_rank(down: Tensor, up: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(down, up)`` of rank r zero-padded to rank k ≥ r: ``up_k down_k = up down`` exactly.

    ``down`` is ``(r, in, …)`` (a conv's kernel dims after ``in``), ``up`` ``(out, r, …)``.
    """
    r = down.shape[0]
    if r == k:
        return down, up
    down = torch.cat([down, down.new_zeros(k - r, *down.shape[1:])], 0)
    up = torch.cat([up, up.new_zeros(up.shape[0], k - r, *up.shape[2:])], 1)
    return down, up


def kohya_tensors(model: nn.Module, prefix: str, **options) -> tuple[dict[str, Tensor], dict[str, float]]:
    """``(tensors, rel_errors)`` of one component under ``prefix`` (``lora_unet``, …)."""
    check_exportable(model, "kohya", "kohya")
    check_no_trained_base(model, "kohya")
    peft, ranks, _, rel_errors = lora_tensors(model, fold_magnitude=True, **options)
    # one rank k per component, alpha = k: diffusers reads one alpha per component
    # (its per-module alpha_pattern keys match no module), so mixed ranks would be
    # scaled by alpha_common / k_module; zero-padding is exact for every client
    pad_to = max(ranks.values())
    tensors = {}
    for name in ranks:
        key = f"{prefix}_{name.replace('.', '_')}"
        down, up = pad_rank(peft[f"{name}.lora_A.weight"], peft[f"{name}.lora_B.weight"], pad_to)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(pad_to))
    return tensors, {f"{prefix}_{n}": e for n, e in rel_errors.items()}


def export_kohya(model: nn.Module | None, path: str | os.PathLike, *, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None, max_rank: int | str | None = None,
                 energy: float = 0.999, fold_magnitude: bool = True,
                 dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s adapter (a UNet or a CLIP text encoder) and, optionally, the
    text encoders' as one kohya/A1111/ComfyUI ``.safetensors`` file; return its path.

    ``path`` is the file (``….safetensors``) or a folder to write ``lora.safetensors``
    into. ``max_rank`` / ``energy`` truncate as in :func:`export_peft`, and the
    per-module relative errors go into the ``lorakit_rel_errors`` metadata. DoRA is
    always folded into plain LoRA (``fold_magnitude=False`` is refused for it).

        export_kohya(unet, "my_lora.safetensors", text_encoder=pipe.text_encoder)
        pipe.load_lora_weights("my_lora.safetensors")
    """
    components = [m for m in (model, text_encoder, text_encoder_2) if m is not None]
    if not fold_magnitude and any(adapter_config(m).get("magnitude") for m in components):  # plain LoRA: no fold
        raise AdapterError("the kohya format has no DoRA magnitude every client reads; a DoRA adapter is written "
                           "folded (fold_magnitude=True, the default)")
    parts = []
    if model is not None:
        parts.append((model, component_prefix(model)))
    encoders = [m for m in (text_encoder, text_encoder_2) if m is not None]
    for i, encoder in enumerate(encoders, 1):
        prefix = component_prefix(encoder)
        if prefix != "lora_te":
            raise AdapterError(f"text_encoder: {type(encoder).__name__} is not a CLIP text encoder")
        parts.append((encoder, f"lora_te{i}" if text_encoder_2 is not None else prefix))
    if not parts:
        raise AdapterError("nothing to export: give a UNet and/or text encoders")
    if sum(p == "lora_te" for _, p in parts) > 1:
        raise AdapterError("two CLIP text encoders: pass the second as text_encoder_2")
    tensors, rel_errors = {}, {}
    for component, prefix in parts:
        t, e = kohya_tensors(component, prefix, max_rank=max_rank, energy=energy, dtype=dtype)
        tensors.update(t)
        rel_errors.update(e)
    check_finite_tensors(tensors.items(), "kohya export refused")
    target = Path(path)
    if target.suffix != ".safetensors":
        target = target / KOHYA_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    # kohya's own metadata keys, which A1111/ComfyUI show; alpha = dim per module
    metadata = {"format": "pt", "ss_network_module": "networks.lora",
                "lorakit_rel_errors": json.dumps(rel_errors, sort_keys=True)}
    atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return target
