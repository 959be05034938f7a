"""PEFT's LoRA/DoRA tensor layout and config: the one standard every exporter writes.

Format knowledge only (no ``peft`` import), shared by ``lorakit.transformers``
(``adapter_model.safetensors`` for PEFT and transformers) and ``lorakit.diffusers``
(``pytorch_lora_weights.safetensors``). For each adapted module ``<name>``:

    <prefix><name>.lora_A.weight                  (k × in), a k-channel conv for Conv2d
    <prefix><name>.lora_B.weight                  (out × k), a 1×1 conv for Conv2d
    <prefix><name>.lora_magnitude_vector.weight   (out,)   DoRA heads only

The factors are :func:`export_factors`: ``W_eff − W̄`` of any recipe (residual terms
folded in, generators evaluated once) reduced exactly with a QR + small SVD, so
``lora_alpha = k`` (scale 1) and the factors carry everything. Modules whose rank
differs from the most common one get ``rank_pattern`` / ``alpha_pattern`` entries.
The magnitude is written under the name of PEFT's parameter (``…vector.weight``):
PEFT and diffusers accept it, and transformers' ``load_adapter`` needs the suffix.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .adapter import adapted_layers, adapter_config
from .model_ops import export_factors
from .primitives import AdapterError
from .trained import saved_modules, trained_biases

DORA_KEY = "lora_magnitude_vector.weight"
TRUNCATION_TOL = 1e-6  # relative error above fp32 round-off: a truncation worth reporting


class TruncationWarning(UserWarning):
    """An export at a rank lower than the update's rank lost part of the update."""


def check_exportable(model: nn.Module, layout: str, what: str) -> None:
    """Every adapted layer's kind declares ``layout`` among its :attr:`LayerKind.exports`;
    otherwise one error naming the module and its layer type."""
    for name, layer in adapted_layers(model).items():
        if layout not in layer.kind.exports:
            raise AdapterError(f"module {name!r} is a {type(layer.base).__name__}, which the {what} format cannot "
                               f"hold (its layer kind exports {sorted(layer.kind.exports) or 'nothing'}); "
                               "leave it out of the targets")


def check_no_trained_base(model: nn.Module, what: str) -> None:
    """Formats holding only LoRA factors (diffusers', kohya's) would drop what the adapter
    trained in the base (``bias=``, ``modules_to_save``) without a word: one error instead."""
    options = []
    if trained_biases(model):
        options.append(f"bias={adapter_config(model).get('bias')!r} (trained biases)")
    if saved := sorted(saved_modules(model)):
        options.append(f"modules_to_save (trained modules {saved})")
    if options:
        raise AdapterError(f"the {what} format cannot hold {' or '.join(options)}: the export would drop them; "
                           "export with lorakit.transformers.export_peft, or train without them")


def lora_tensors(model: nn.Module, rank: int | None = None, *, prefix: str = "",
                 dtype: torch.dtype | None = None, max_rank: int | str | None = None, energy: float = 0.999,
                 fold_magnitude: bool = False) -> tuple[dict[str, Tensor], dict[str, int], bool, dict[str, float]]:
    """``(tensors, ranks, use_dora, rel_errors)`` of ``model``'s adapter in PEFT's layout.

    By default every module's update is kept exactly (its numerical rank, ≤ 2r).
    ``max_rank=k`` truncates each module to rank ≤ k, ``max_rank="auto"`` to the
    fewest directions holding ``energy`` of its update (``rank=k``: exactly k,
    zero-padded); a :class:`TruncationWarning` lists the relative errors.
    ``fold_magnitude`` writes DoRA/OP-DoRA heads as plain LoRA factors of
    ``W_eff − W̄`` (core's ``export_factors``) for clients without DoRA.
    """
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise AdapterError(f"export rank={rank!r}: give an integer >= 1, or None to export exactly")
    check_exportable(model, "peft", "PEFT")
    layers = adapted_layers(model)
    # raises if there is no adapter, or it is merged/disabled, or max_rank/energy are invalid
    factors = export_factors(model, rank, max_rank=max_rank, energy=energy, fold_magnitude=fold_magnitude)
    magnitudes = {f.magnitude is not None for f in factors.values()}
    if len(magnitudes) > 1:
        raise AdapterError("a LoRA file has one use_dora flag, but only some modules of this model have a "
                           "magnitude head; export them as two adapters")
    tensors, ranks = {}, {}
    for name, f in factors.items():
        layer = layers[name]
        try:
            B, A, m = layer.kind.peft_factors(layer.base, f.B, f.A, f.magnitude)
        except AdapterError as exc:
            raise AdapterError(f"module {name!r}: {exc}") from None
        key_A, key_B = getattr(layer.kind, "peft_keys", ("lora_A.weight", "lora_B.weight"))
        named = {key_A: A, key_B: B, DORA_KEY: m}
        for key, t in named.items():
            if t is not None:
                tensors[f"{prefix}{name}.{key}"] = t.detach().to("cpu", dtype or t.dtype).contiguous()
        ranks[name] = f.A.shape[0]
    rel_errors = {name: f.rel_error for name, f in factors.items()}
    # only an explicit rank truncates; rank=None drops nothing the fp32 factors hold
    cap = rank if rank is not None else max_rank
    lost = {n: e for n, e in rel_errors.items() if e > TRUNCATION_TOL} if cap is not None else {}
    if lost:
        worst = ", ".join(f"{n}: {e:.3g}" for n, e in sorted(lost.items(), key=lambda kv: -kv[1])[:8])
        warnings.warn(
            f"export at rank {cap} truncated {len(lost)} of {len(rel_errors)} modules; relative error "
            f"‖ΔW − ΔW_r‖/‖ΔW‖ (largest first): {worst}. Export with max_rank=None to keep the update exactly.",
            TruncationWarning, stacklevel=3)
    return tensors, ranks, magnitudes == {True}, rel_errors


def most_common_rank(ranks: Mapping[str, int]) -> int:
    """The rank most modules have (ties: the larger), the base rank of a rank pattern."""
    counts = Counter(ranks.values())
    return max(counts, key=lambda k: (counts[k], k))


def lora_config(ranks: dict[str, int], *, use_dora: bool = False, fan_in_fan_out: bool = False,
                base_model_name_or_path: str | None = None, task_type: str | None = None,
                dropout: float = 0.0) -> dict:
    """A PEFT ``LoraConfig`` (as JSON) whose scaling is 1 for every module.

    ``r`` is the most common rank; other modules get ``rank_pattern`` and
    ``alpha_pattern`` entries keyed by ``^`` + their escaped full name: PEFT (>= 0.15)
    matches a key with ``re.match(r"(.*\\.)?(key)$", name)``, so the anchor makes it
    hit exactly that module, never a longer name ending the same way (diffusers
    writes its own keys so too). ``target_modules`` lists full names so exactly the
    exported modules are adapted.
    """
    r = most_common_rank(ranks)
    pattern = {"^" + re.escape(name): k for name, k in sorted(ranks.items()) if k != r}
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
        "lora_dropout": dropout,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
