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
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .adapter import adapted_layers, adapter_config
from .experts import LAYER_NAME, split_layer_names
from .model_ops import ExportedLayer, export_factors
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
    experts = split_layer_names(layers)[1]
    # PEFT's parameter LoRA (ParamWrapper) refuses use_dora for the whole config: with fused
    # expert tensors every magnitude is folded into plain factors (exact at full rank)
    fold_magnitude = fold_magnitude or bool(experts)
    # raises if there is no adapter, or it is merged/disabled, or max_rank/energy are invalid
    factors = export_factors(model, rank, max_rank=max_rank, energy=energy, fold_magnitude=fold_magnitude)
    rel_errors = {name: f.rel_error for name, f in factors.items()}
    expert_tensors, expert_ranks = _expert_tensors(model, factors, prefix, dtype)
    factors = {name: f for name, f in factors.items() if name in split_layer_names(factors)[0]}
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
    tensors.update(expert_tensors)
    ranks.update(expert_ranks)
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


def _expert_tensors(model: nn.Module, factors: Mapping[str, ExportedLayer], prefix: str,
                    dtype: torch.dtype | None) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Fused expert tensors in PEFT's ``target_parameters`` layout (``lora.ParamWrapper``).

    For a parameter of E experts exported at rank k (the largest of any expert's exact rank;
    the others are zero-padded, which adds nothing), with ``lora_alpha = k`` (scale 1):

        <module>.[base_layer.]*lora_A.weight   (E·k, in)   row e·k + j   = A_e[j]
        <module>.[base_layer.]*lora_B.weight   (out, k·E)  column j·E + e = B_e[:, j]

    ``in``/``out`` are the expert matrix's (PEFT swaps its axes for an (E, out, in) tensor
    and not for an ``is_transposed`` one, so the files agree with this). PEFT wraps the
    parameters of one module in nested wrappers in their declaration order, the first
    innermost: the i-th of n targeted parameters has ``base_layer.`` n−1−i times.
    Key: full parameter name (``target_parameters`` and ``rank_pattern`` match it)."""
    by_param: dict[str, list[tuple[int, ExportedLayer]]] = {}
    for name, f in factors.items():
        match = LAYER_NAME.match(name)
        if match is not None:
            by_param.setdefault(f"{match['module']}.{match['param']}", []).append((int(match["expert"]), f))
    tensors, ranks = {}, {}
    per_module: dict[str, list[str]] = {}
    for full in by_param:
        module, _, param = full.rpartition(".")
        per_module.setdefault(module, []).append(param)
    # one rank for every fused tensor (zero padding is exact): no rank_pattern entry for a
    # parameter, which PEFT (0.21) would honour but also warn "did not match any targeted module"
    k = max(f.A.shape[0] for fs in by_param.values() for _, f in fs) if by_param else 1
    for module, params in per_module.items():
        base = model.get_submodule(module).get_submodule("base")
        order = [p for p, _ in base.named_parameters(recurse=False) if p in params]
        for i, param in enumerate(order):
            experts = [f for _, f in sorted(by_param[f"{module}.{param}"], key=lambda ef: ef[0])]
            A = torch.cat([_pad(f.A, k, 0) for f in experts])  # (E·k, in)
            B = torch.stack([_pad(f.B, k, 1) for f in experts], dim=2).flatten(1)  # (out, k·E)
            key = f"{prefix}{module}." + "base_layer." * (len(order) - 1 - i)
            tensors[key + "lora_A.weight"] = A.detach().to("cpu", dtype or A.dtype).contiguous()
            tensors[key + "lora_B.weight"] = B.detach().to("cpu", dtype or B.dtype).contiguous()
            ranks[f"{module}.{param}"] = k
    return tensors, ranks


def _pad(t: Tensor, k: int, dim: int) -> Tensor:
    """``t`` with zero rows (dim 0) or columns (dim 1) up to ``k``."""
    missing = k - t.shape[dim]
    return t if missing == 0 else torch.cat([t, t.new_zeros((missing, t.shape[1]) if dim == 0
                                                            else (t.shape[0], missing))], dim=dim)


def most_common_rank(ranks: Mapping[str, int]) -> int:
    """The rank most modules have (ties: the larger), the base rank of a rank pattern."""
    counts = Counter(ranks.values())
    return max(counts, key=lambda k: (counts[k], k))


def lora_config(ranks: dict[str, int], *, use_dora: bool = False, fan_in_fan_out: bool = False,
                base_model_name_or_path: str | None = None, task_type: str | None = None,
                dropout: float = 0.0, parameters: Iterable[str] = ()) -> dict:
    """A PEFT ``LoraConfig`` (as JSON) whose scaling is 1 for every module.

    ``r`` is the most common rank; other modules get ``rank_pattern`` and
    ``alpha_pattern`` entries keyed by ``^`` + their escaped full name: PEFT (>= 0.15)
    matches a key with ``re.match(r"(.*\\.)?(key)$", name)``, so the anchor makes it
    hit exactly that module, never a longer name ending the same way (diffusers
    writes its own keys so too). ``target_modules`` lists full names so exactly the
    exported modules are adapted. ``parameters``: the keys of ``ranks`` that are fused
    parameters (``target_parameters``, full names); PEFT refuses ``lora_dropout`` for them,
    so it is written 0 then (dropout acts in training only).
    """
    parameters = sorted(parameters)
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
        "target_modules": sorted(set(ranks) - set(parameters)),
        **({"target_parameters": parameters} if parameters else {}),
        "use_dora": use_dora,
        "use_rslora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0 if parameters else dropout,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
