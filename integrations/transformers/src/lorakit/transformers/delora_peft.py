"""PEFT's DeLoRA adapter (``peft.tuners.delora``, ``peft_type "DELORA"``): export and import.

PEFT computes, for each adapted ``torch.nn.Linear`` (``DeloraLinear.forward``),

    ΔW = (λ/r) · B diag(1 / (max(‖b_i‖, 1e-4) · max(‖a_i‖, 1e-4))) A diag(w)

from ``<module>.delora_A`` (r × in), ``.delora_B`` (out × r), ``.delora_lambda`` (1,)
and ``.delora_w_norm`` (in,: ``‖W̄[:, j]‖``, saved), keys under ``base_model.model.``;
``B0 = 0`` at init and nothing is subtracted. That is lorakit's ``DeLoRA`` normalizer
with ``eps = 1e-4``, ``d = 1`` and no residual (``init="kaiming"``).

**Export**, per module, exact either way:

- *as is* — a layer computing exactly PEFT's function of its slots (no residual,
  ``eps = 1e-4``, ``d`` all ones) writes its ``A``, ``B``, ``λ``, ``w``: PEFT trains on
  from the same parameters (``weight_norm="frobenius"`` writes ``w`` as a constant column).
- *rewritten* — anything else with a DeLoRA normalizer (the recipe ``delora``'s residual
  ``λN − λ0N0``, the official ``λ(N − N0)``, a trained ``d``, another ``eps``, a generated
  ``A``/``B``, evaluated once). PEFT's terms all have the size ``λ/r`` (unit ``b̂_i``,
  ``â_i``, one λ per module); ``λN − λ0N0`` has ``r`` terms of size ``λ/r`` and ``r`` of
  size ``λ0/r``, so it is not PEFT's factors as they are unless ``λ = λ0``. It is PEFT's
  form after an exact rewrite (:func:`equal_terms`): the SVD ``M = ΔW diag(1/w) = U Σ Vᵀ``
  (rank ``k ≤ 2r``) turned by an orthogonal ``Q`` that makes every term the same size
  (Schur–Horn), so ``r = k`` and ``λ = ‖M‖_*``, every saved norm 1 (PEFT's clamp never
  acts). PEFT training it further trains all of it (PEFT has no frozen residual): that
  is PEFT's DeLoRA from this point, not lorakit's.

PEFT's DeLoRA cannot hold (one error each): a layer other than ``nn.Linear``, another
normalizer, a magnitude head, trained biases or ``modules_to_save``.

**Import** builds ``Adapter(normalizer=DeLoRA(lambda0, eps=1e-4), init=Kaiming())`` and
loads ``A``, ``B``, ``λ`` and the file's ``w`` (as PEFT does), or merges the update and
applies a recipe (``peft_reader``'s two semantics). A module with ``r > min(out, in)``
(PEFT allows it, lorakit's layers do not) gets the same update at its own rank
(:func:`equal_terms`, a new λ).
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import Tensor, nn

from lorakit.core import Adapter, AdapterError, Role, adapted_layers, registry
from lorakit.core.functional import kept_rank, lowrank_svd
from lorakit.core.layer_kinds import LinearKind
from lorakit.core.lora import Direct, Kaiming
from lorakit.core.peft_format import most_common_rank
from lorakit.core.trained import saved_modules, trained_biases
from lorakit.core.validation import check_finite_tensors
from lorakit.normalizers import DeLoRA

from .peft_reader import PeftImportError, group_by_module, load_weights, merge_then_apply
from .peft_writer import PEFT_PREFIX, PeftExport, warn_if_merged_base

PEFT_TYPE = "DELORA"
PEFT_EPS = 1e-4  # peft/tuners/delora/layer.py clamps ‖a_i‖ and ‖b_i‖ here (not configurable)
PARTS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
_KEY = re.compile(r"(?P<module>.+)\.(?P<part>" + "|".join(PARTS) + ")")
# DeloraConfig fields that change what the adapter computes, with the value lorakit supports
_UNSUPPORTED = {"bias": "none", "modules_to_save": None}
# the way out, named for both callers: export_peft's argument and the CLI's flag
AS_LORA = "format='lora' (lorakit export --format peft)"


def _check_exportable(name: str, layer) -> None:
    if type(layer.kind) is not LinearKind or not isinstance(layer.base, nn.Linear):
        raise AdapterError(f"module {name!r} is a {type(layer.base).__name__}; PEFT's DeLoRA adapts torch.nn.Linear "
                           f"only: leave it out of the targets, or export {AS_LORA}")
    if not isinstance(layer.normalizer, DeLoRA):
        raise AdapterError(f"module {name!r} has the {layer.normalizer.name!r} normalizer; format='delora' writes "
                           f"DeLoRA adapters (normalizer 'delora'): export it with {AS_LORA}")
    if layer.magnitude is not None:
        raise AdapterError(f"module {name!r} has the magnitude head {layer.magnitude.name!r}, which PEFT's DeLoRA "
                           f"cannot hold: export it with {AS_LORA} (DoRA heads as use_dora)")
    if layer.merged or layer.disabled:
        raise AdapterError(f"module {name!r} is {'merged' if layer.merged else 'disabled'}; "
                           f"{'unmerge(model)' if layer.merged else 'enable it'} before exporting")


def _as_is(layer) -> dict[str, Tensor] | None:
    """PEFT's tensors from the layer's own slots, if it computes exactly PEFT's DeLoRA of them."""
    if layer.residual or layer.normalizer.eps != PEFT_EPS:
        return None
    s = layer.slots()
    A, B, d = (s[layer.slots.names_with(role)[0]] for role in (Role.A, Role.B, Role.D))
    if not bool((d == 1).all()):
        return None
    return {"delora_A": A, "delora_B": B, "delora_lambda": s["lambda_"].reshape(1),
            "delora_w_norm": s["w_norm"].expand(A.shape[1])}


def equalizing_rotation(S: Tensor) -> Tensor:
    """Orthogonal ``Q`` with ``diag(Qᵀ diag(S) Q) = mean(S)`` (Schur–Horn; k − 1 Givens rotations).

    Each rotation pairs the running index ``c`` with an untouched ``j`` whose value lies on
    the other side of the mean ``m`` (the remaining values average to ``m``, so one exists)
    and fixes ``j`` at ``m``: ``sin²θ = (m − S_j)/(S_c − S_j)``, ``S_c ← S_c + S_j − m``."""
    k = S.numel()
    m, diag, Q = S.mean(), S.clone(), torch.eye(k, dtype=S.dtype)
    untouched, c = list(range(1, k)), 0
    while untouched:
        pick = min if diag[c] >= m else max
        j = pick(untouched, key=lambda i: float(diag[i]))
        untouched.remove(j)
        a, b = diag[c], diag[j]
        sin2 = ((m - b) / (a - b)).clamp(0, 1) if a != b else a.new_zeros(())
        cos, sin = (1 - sin2).sqrt(), sin2.sqrt()
        Q[:, [c, j]] = Q[:, [c, j]] @ torch.stack([torch.stack([cos, -sin]), torch.stack([sin, cos])])
        diag[c], diag[j] = a + b - m, m
    return Q


def equal_terms(B: Tensor, A: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(B_p, A_p, λ)`` with unit columns/rows and ``(λ/k)·B_p A_p diag(w) = B A`` (fp64), or None for 0.

    ``M = B A diag(1/w) = U Σ Vᵀ`` (rank k); with ``Q`` from :func:`equalizing_rotation`,
    ``P = U Σ^½ Q`` and ``R = Qᵀ Σ^½ Vᵀ`` have every column/row norm² equal to ``m = tr Σ/k``,
    so ``M = m Σ_t p̂_t r̂_tᵀ``: PEFT's form with ``r = k`` and ``λ = k·m = ‖M‖_*``.
    ``A = A'`` is ``(a/‖a‖) ⊙ w``, so its columns where ``w_j = 0`` are exactly 0."""
    B, A, w = B.double(), A.double(), w.double()
    V = torch.where(w > 0, A / torch.where(w > 0, w, 1.0), 0.0)
    U, S, Vh = lowrank_svd(B, V)
    k = kept_rank(S, max(B.shape[0], A.shape[1]))
    if not bool(S[0] > 0):
        return None
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    Q = equalizing_rotation(S)
    P, R = (U * S.sqrt()) @ Q, Q.T @ (S.sqrt()[:, None] * Vh)
    return P / P.norm(dim=0), R / R.norm(dim=1, keepdim=True), S.sum().reshape(1)


def _rewritten(layer) -> dict[str, Tensor]:
    """PEFT's tensors for the layer's exact current update (module docstring)."""
    B, A, _ = layer.factors()
    w = layer.slots()["w_norm"].double().expand(A.shape[1])
    terms = equal_terms(B, A, w)
    if terms is None:  # a zero update: PEFT's own init, B = 0
        A0 = torch.zeros(1, A.shape[1], dtype=torch.float64)
        A0[0, 0] = 1.0
        terms = (A0.new_zeros(B.shape[0], 1), A0, torch.tensor([float(layer.normalizer.lambda0)]))
    return dict(zip(PARTS, (terms[1], terms[0], terms[2], w)))


def delora_config(ranks: dict[str, int], lambda0: float, *, base_model_name_or_path: str | None = None,
                  task_type: str | None = None, dropout: float = 0.0) -> dict:
    """A PEFT ``DeloraConfig`` (as JSON): ``r`` the most common rank, the others in ``rank_pattern``
    keyed ``^`` + the escaped full name (as ``peft_format.lora_config``); λ's values are in the file."""
    r = most_common_rank(ranks)
    return {"peft_type": PEFT_TYPE, "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
            "r": r, "delora_lambda": lambda0, "lambda_pattern": {},
            "rank_pattern": {"^" + re.escape(n): k for n, k in sorted(ranks.items()) if k != r},
            "target_modules": sorted(ranks), "exclude_modules": None, "module_dropout": dropout, "bias": "none",
            "modules_to_save": None, "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "inference_mode": True}


def delora_export(model: nn.Module, *, prefix: str = PEFT_PREFIX, base_model_name_or_path: str | None = None,
                  dtype: torch.dtype | None = None, task_type: str | None = None) -> PeftExport:
    """``model``'s DeLoRA adapter as PEFT's DeLoRA tensors and config (module docstring), exact."""
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter to export; apply one first")
    for name, layer in layers.items():
        _check_exportable(name, layer)
    trained = [f"trained biases {sorted(trained_biases(model))}"] if trained_biases(model) else []
    trained += [f"modules_to_save {sorted(saved_modules(model))}"] if saved_modules(model) else []
    if trained:
        raise AdapterError(f"PEFT DeLoRA export: lorakit writes only DeLoRA tensors and would drop the "
                           f"{' and '.join(trained)}: export {AS_LORA}, or train without them")
    warn_if_merged_base(model)
    tensors, ranks = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            parts = _as_is(layer) or _rewritten(layer)
            ranks[name] = parts["delora_A"].shape[0]
            out_dtype = dtype or layer.slots()["w_norm"].dtype
            tensors.update({f"{prefix}{name}.{k}": v.detach().to("cpu", out_dtype).contiguous()
                            for k, v in parts.items()})
    check_finite_tensors(tensors.items(), "PEFT DeLoRA export refused")
    lambda0 = float(next(iter(layers.values())).normalizer.lambda0)
    config = delora_config(ranks, lambda0, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                           dropout=max(layer.dropout for layer in layers.values()))
    return PeftExport(tensors, config, dict.fromkeys(ranks, 0.0))


def read_delora(path, config: dict, prefix: str = PEFT_PREFIX) -> dict[str, dict[str, Tensor]]:
    """``{module: {part: tensor}}`` from a PEFT DeLoRA folder whose config is ``config``, validated."""
    odd = {k: config[k] for k, ok in _UNSUPPORTED.items() if config.get(k, ok) not in (ok, None, [], {})}
    if odd:
        raise PeftImportError(f"{path}: these DeloraConfig options have no lorakit equivalent: {odd}; "
                              "retrain without them or merge the adapter with PEFT instead")
    weights, tensors = load_weights(path)
    modules, unknown = group_by_module(tensors, prefix, _KEY)
    if unknown:
        raise PeftImportError(f"{weights}: {len(unknown)} keys lorakit does not understand: "
                              f"{', '.join(sorted(unknown)[:12])}; a DeLoRA adapter holds "
                              f"'{prefix}<module>.' + one of {PARTS}")
    if not modules:
        raise PeftImportError(f"{weights} holds no DeLoRA tensors")
    for name, parts in sorted(modules.items()):
        if set(parts) != set(PARTS):
            raise PeftImportError(f"{weights}: module {name!r} has {sorted(parts)}, expected {sorted(PARTS)}")
    check_finite_tensors(tensors.items(), f"{weights} refused")
    return modules


def _matrices(name: str, parts: dict[str, Tensor], base: nn.Module, kind) -> tuple[Tensor, ...]:
    """``(A, B, λ, w)`` in fp32, shape-checked against ``base``."""
    W = kind.matrix(base)
    out_f, in_f = W.shape
    A, B, lam, w = (parts[k].to(W.device, torch.float32) for k in PARTS)
    r = A.shape[0]
    if A.dim() != 2 or A.shape[1] != in_f or B.shape != (out_f, r) or lam.numel() != 1 or w.shape != (in_f,):
        raise PeftImportError(f"module {name!r} is {out_f}x{in_f} but the file's delora_B, delora_A, "
                              f"delora_lambda, delora_w_norm are {tuple(B.shape)}, {tuple(A.shape)}, "
                              f"{tuple(lam.shape)}, {tuple(w.shape)}; the adapter was made for another model")
    return A, B, lam.reshape(()), w


def _peft_factors(A: Tensor, B: Tensor, lam: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """PEFT's ``ΔW`` as factors ``(B', A')``."""
    scale = lam / A.shape[0] / (A.norm(dim=1).clamp(min=PEFT_EPS) * B.norm(dim=0).clamp(min=PEFT_EPS))
    return B * scale, A * w


def import_delora(model: nn.Module, path, config: dict, recipe: Adapter | str | None = None, *,
                  prefix: str = PEFT_PREFIX) -> nn.Module:
    """``peft_reader.import_peft`` for a PEFT DeLoRA folder; on any error the model is unchanged."""
    modules = read_delora(path, config, prefix)
    if adapted_layers(model):
        raise PeftImportError(f"{type(model).__name__} already has a lorakit adapter; import into the base "
                              "model (lorakit.core.unload(model) first)")
    names = dict(model.named_modules())
    if missing := sorted(set(modules) - set(names)):
        raise PeftImportError(f"{path}: modules {missing[:8]} are not in {type(model).__name__}; "
                              "the adapter was made for another architecture")
    values = {}
    for name, parts in modules.items():
        kind = registry.layer_kind(names[name])
        if type(kind) is not LinearKind:
            raise PeftImportError(f"module {name!r} is a {type(names[name]).__name__}; PEFT's DeLoRA adapts "
                                  "torch.nn.Linear only")
        values[name] = (kind, _matrices(name, parts, names[name], kind))
    targets = "(?:" + "|".join(re.escape(n) for n in sorted(modules)) + ")"
    if recipe is not None:
        updates = {name: (kind, (*_peft_factors(*m), None)) for name, (kind, m) in values.items()}
        adapter = Adapter.from_recipe(recipe) if isinstance(recipe, str) else recipe
        return merge_then_apply(model, updates, adapter, targets, path)
    for name, (kind, (A, B, lam, w)) in values.items():
        # PEFT allows r > min(out, in), lorakit's layers do not: the same update at its own rank
        if A.shape[0] > min(B.shape[0], A.shape[1]) and (terms := equal_terms(*_peft_factors(A, B, lam, w), w)):
            values[name] = (kind, (terms[1].float(), terms[0].float(), terms[2].float().reshape(()), w))
    ranks = {name: A.shape[0] for name, (_, (A, *_)) in values.items()}
    r = most_common_rank(ranks)
    Adapter(generator=Direct(), normalizer=DeLoRA(lambda0=float(config.get("delora_lambda", 15)), eps=PEFT_EPS),
            init=Kaiming(), rank=r, rank_pattern={n: k for n, k in ranks.items() if k != r},
            dropout=float(config.get("module_dropout", 0.0))).apply(model, targets=targets)
    layers = adapted_layers(model)
    far = {}
    with torch.no_grad():
        for name, (_, (A, B, lam, w)) in values.items():
            slots = layers[name].slots
            mine, frobenius = slots.w_norm, layers[name].base.weight.float().norm()
            # the column norms of this base, or its Frobenius norm (a weight_norm="frobenius" export)
            err = min(float((w - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) for ref in (mine, frobenius))
            if err > 1e-5:
                far[name] = err
            params = slots.parameters_by_slot()
            for role, value in ((Role.A, A), (Role.B, B), (Role.SCALAR, lam)):
                params[slots.names_with(role)[0]].copy_(value.reshape(params[slots.names_with(role)[0]].shape))
            mine.copy_(w)  # PEFT computes with the saved norms
    if far:
        warnings.warn(f"{path}: delora_w_norm differs from this model's column norms ‖W̄[:, j]‖ (largest relative "
                      f"difference {max(far.values()):.3g}, in {len(far)} modules): the adapter was probably "
                      "trained on another base; the file's norms are used, as PEFT does", UserWarning, stacklevel=3)
    return model
