"""Conformance kit: the properties of docs/design.md, "The primitive contract", for any
combination of primitives.

In a plugin's tests::

    from hypothesis import given, settings
    from lorakit.conformance import cases, check_combination, combinations

    @pytest.mark.parametrize("combo", combinations(include=[MyInit()]), ids=str)
    @given(case=cases())
    @settings(max_examples=10, deadline=None)
    def test_my_init_conforms(combo, case):
        check_combination(combo, case)

``combinations()`` crosses every registered generator, normalizer, initializer and
magnitude head (default arguments) and adds every registered recipe; ``include``
restricts it to the combinations containing the given primitives.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from lorakit.core.adapter import Adapter, adapted_layers
from lorakit.core.checkpoint import load, load_optimizer, save
from lorakit.core.layer_kinds import plain_tensors
from lorakit.core.model_ops import export_factors, freeze_generators, merge, unmerge
from lorakit.core.plugins import format_spec, registry
from lorakit.core.primitives import DORA_MAGNITUDE, FACTOR_NAMES, Primitive, Role
from lorakit.core.trained import trained_biases

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Combo:
    generator: dict
    normalizer: dict
    init: dict
    magnitude: dict | None

    def adapter(self, rank: int, seed: int = 0, dropout: float = 0.0, bias: str = "none") -> Adapter:
        return Adapter(generator=self.generator, normalizer=self.normalizer, init=self.init,
                       magnitude=self.magnitude, rank=rank, seed=seed, dropout=dropout, bias=bias)

    def __str__(self) -> str:
        parts = [self.generator, self.normalizer, self.init, self.magnitude]
        return "+".join(format_spec(p) for p in parts if p)


def _key(spec):
    return None if spec is None else (spec["name"], tuple(sorted(spec["args"].items())))


def combinations(include: Sequence[Primitive] = ()) -> list[Combo]:
    reg = registry.load()
    default = {kind: [{"name": n, "args": {}} for n in sorted(reg.primitives[kind])]
               for kind in ("generator", "normalizer", "initializer", "magnitude")}
    for p in include:
        spec = p.spec()
        if spec not in default[p.kind]:
            default[p.kind].append(spec)
    combos = [Combo(g, n, i, m) for g, n, i, m in itertools.product(
        default["generator"], default["normalizer"], default["initializer"], [None, *default["magnitude"]])]
    combos += [Combo(**r.composition()) for r in reg.recipes.values()]
    unique = {(_key(c.generator), _key(c.normalizer), _key(c.init), _key(c.magnitude)): c for c in combos}
    wanted = [p.spec() for p in include]
    return [c for c in unique.values()
            if all(s in (c.generator, c.normalizer, c.init, c.magnitude) for s in wanted)]


@dataclass
class Case:
    # "linear", "conv1d", "conv2d", "conv3d", "embedding" (in_f is the vocabulary; not drawn by cases()) or
    # "experts" (fused expert tensors, conformance.experts; drawn by cases(layers=EXPERT_LAYERS))
    layer: str
    in_f: int
    hidden: int
    out_f: int
    rank: int
    dtype: torch.dtype
    batch: int
    seed: int
    dropout: float = 0.0
    bias: str = "none"


LAYERS = ("linear", "linear", "linear", "linear", "conv1d", "conv2d", "conv2d", "conv3d")
EXPERT_LAYERS = ("experts",)  # check_combination only (check_precision / check_autocast take module targets)


@st.composite
def cases(draw, max_dim: int = 64, dtypes=(torch.float64, torch.float32, torch.bfloat16),
          layers: Sequence[str] = LAYERS) -> Case:
    layer = draw(st.sampled_from(list(layers)))
    top = max_dim if layer == "linear" else 8
    in_f, hidden, out_f = (draw(st.integers(1, top)) for _ in range(3))
    limit = (min(in_f, hidden, out_f) if layer in ("linear", "experts")
             else min(hidden, out_f, in_f * 3 ** _CONV_DIMS[layer]))
    rank = draw(st.integers(1, max(limit, 1)))
    return Case(layer, in_f, hidden, out_f, rank, draw(st.sampled_from(dtypes)),
                draw(st.integers(1, 4)), draw(st.integers(0, 2**16)), draw(st.sampled_from([0.0, 0.0, 0.25])),
                draw(st.sampled_from(["none", "none", "adapted"])))


_CONV_DIMS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}


def build_model(case: Case, device: str = "cpu") -> tuple[nn.Module, torch.Tensor]:
    """Two target layers with a non-linearity between them, and an input batch, drawn
    on the CPU (the same values on any device) and moved to ``device``."""
    g = torch.Generator().manual_seed(case.seed)
    if case.layer == "linear":
        model = nn.Sequential(nn.Linear(case.in_f, case.hidden), nn.Tanh(), nn.Linear(case.hidden, case.out_f))
        x = torch.randn(case.batch, case.in_f, generator=g)
    elif case.layer == "experts":  # two fused expert tensors, TOKENS tokens per batch element
        from .experts import TOKENS, TinyExperts, ensure_registered

        ensure_registered()
        model = nn.Sequential(TinyExperts(case.in_f, case.hidden, case.out_f))
        x = torch.randn(case.batch, TOKENS, case.in_f, generator=g)
    elif case.layer == "embedding":  # a vocabulary of in_f, sequences of 6 indices
        model = nn.Sequential(nn.Embedding(case.in_f, case.hidden), nn.Tanh(), nn.Linear(case.hidden, case.out_f))
        x = torch.randint(0, case.in_f, (case.batch, 6), generator=g)
    else:  # a 3-wide kernel then a 1-wide one, of the case's dimension
        dims = _CONV_DIMS[case.layer]
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        model = nn.Sequential(conv(case.in_f, case.hidden, 3, padding=1), nn.Tanh(), conv(case.hidden, case.out_f, 1))
        x = torch.randn(case.batch, case.in_f, *(5,) * dims, generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 if p.dim() > 1 else
                    torch.randn(p.shape, generator=g) * 0.1)
    return model.to(device, case.dtype), x.to(device, case.dtype if x.is_floating_point() else x.dtype)


def assert_close(actual, expected, dtype, what: str, scale: float = 1.0) -> None:
    tol = TOLERANCE[dtype] * scale
    ref = expected.detach().double()
    err = (actual.detach().double() - ref).abs().max().item()
    bound = tol * (1 + ref.abs().max().item())
    assert err <= bound, f"{what}: max abs diff {err:.3e} > {bound:.3e}"


def perturb(model: nn.Module, seed: int, size: float = 0.3) -> None:
    """Move every trainable parameter, as training would."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)
                p.add_(noise * size * (p.detach().abs().mean() + 0.1))


def _loss(model, x, seed: int = 0):
    return _seeded(lambda: model(x), seed).float().square().mean()


def _seeded(forward, seed: int):
    """``forward()`` with the global RNG at ``seed`` (restored after): two models in
    training mode then draw the same dropout masks, so they can be compared exactly."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return forward()


def check_combination(combo: Combo, case: Case, device: str = "cpu") -> None:
    """All properties of docs/design.md, "The primitive contract", that need no external
    client, for one case (on ``device``: ``LORAKIT_TEST_DEVICE=cuda``, scripts/gpu_check.sh)."""
    model, x = build_model(case, device)
    pristine = copy.deepcopy(model)
    base_out = model(x)
    adapter = combo.adapter(case.rank, seed=case.seed, dropout=case.dropout, bias=case.bias)
    apply_to(adapter, model, case)
    # each layer's W̄ (an expert's matrix is a view of its fused tensor): apply changed nothing yet
    base_weights = {n: layer.kind.matrix(layer.base).detach().clone() for n, layer in adapted_layers(model).items()}

    # 1. identity at init (in training mode: with dropout too, B'A' − B0'A0' = 0 on any input)
    assert_close(model(x), base_out, case.dtype, f"{combo}: identity at init")

    # 5. only trainable slots (and the biases bias= trains) get gradients
    _loss(model, x).backward()
    biases = trained_biases(model)
    for name, p in model.named_parameters():
        if ".base." in name and name not in biases:
            assert not p.requires_grad and p.grad is None, f"{combo}: base parameter {name} is trainable"
        elif p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{combo}: {name} has no finite gradient"
    model.zero_grad(set_to_none=True)

    # 3. the slot contract: what each slot declares is what training does to it
    check_slot_contract(combo, adapter, copy.deepcopy(model), x)

    # 2. merged == unmerged, unmerge restores W̄
    perturb(model, case.seed)
    model.eval()
    with torch.no_grad():
        y = model(x)
        merge(model)
        assert_close(model(x), y, case.dtype, f"{combo}: merged vs unmerged", scale=10)
        unmerge(model)
        for name, layer in adapted_layers(model).items():
            assert_close(layer.kind.matrix(layer.base), base_weights[name], case.dtype,
                         f"{combo}: unmerge restores W of {name}", scale=10)
            layer.kind.set_matrix(layer.base, base_weights[name])  # exact W̄ for the checks below
    model.train()

    # exported factors reproduce the adapted weight: V = W̄ + B A, and the magnitude m
    # (DoRA's W_eff = m/‖V‖·V is a function of exactly these two; comparing g itself
    # would test fp32 conditioning of near-zero rows of V, not the export). A head
    # without DoRA's meaning is exported folded: W_eff − W̄ as plain factors.
    if case.dtype != torch.bfloat16:  # bf16 W̄ makes this a bf16-resolution check only
        layers = adapted_layers(model)
        fold = any(layer.magnitude is not None and not any(
            i.exported_as == DORA_MAGNITUDE for i in layer.slots.slot_info.values()) for layer in layers.values())
        for name, exp in export_factors(model, fold_magnitude=fold).items():
            layer = layers[name]
            with torch.no_grad():
                B, A, g = layer.factors()
                W = layer.kind.matrix(layer.base).double()
                V = W + B.double() @ A.double()
                want = V * g.double()[:, None] if fold and g is not None else V
                assert_close(W + exp.B.double() @ exp.A.double(), want, case.dtype,
                             f"{combo}: export of {name}", scale=10)
                if exp.magnitude is not None:
                    m = layer.slot_value(Role.MAGNITUDE)
                    assert m is not None and torch.equal(exp.magnitude, m), f"{combo}: magnitude of {name}"

    # 4. save -> load -> identical outputs and identical next step
    if any(p.requires_grad for p in model.parameters()):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()
        with tempfile.TemporaryDirectory() as tmp:
            save(model, tmp, optimizer=opt)
            clone = copy.deepcopy(pristine)
            load(clone, tmp)
            opt2 = torch.optim.AdamW([p for p in clone.parameters() if p.requires_grad], lr=1e-2)
            load_optimizer(opt2, tmp)
        assert torch.equal(_seeded(lambda: clone(x), 1), _seeded(lambda: model(x), 1)), \
            f"{combo}: outputs differ after save/load"
        for net, o in ((model, opt), (clone, opt2)):
            _loss(net, x).backward()
            o.step()
        for (n, p), (_, q) in zip(model.named_parameters(), clone.named_parameters()):
            assert torch.equal(p, q), f"{combo}: next step differs after save/load at {n}"


def apply_to(adapter: Adapter, model: nn.Module, case: Case) -> nn.Module:
    """The case's targets: both layers of :func:`build_model`'s model, or every fused expert tensor."""
    if case.layer == "experts":
        return adapter.apply(model, target_parameters="experts")
    return adapter.apply(model, targets=["0", "2"])


def check_slot_contract(combo, adapter: Adapter, model: nn.Module, x: torch.Tensor) -> None:
    """Each layer's slots behave as declared (``Slot.trainable``, the generator's
    ``trainable_factors``): the built module reports them (``trainable_slots()``),
    frozen slots carry no gradient and are bit-identical after optimizer steps, and
    the factor slots train exactly as the generator's ``trainable_factors`` says."""
    layers = adapted_layers(model)
    for name, layer in layers.items():
        info = layer.slots.slot_info
        declared = {n for n, i in info.items() if i.trainable}
        assert layer.slots.trainable_slots() == declared, \
            f"{combo}: {name}: trainable_slots() {sorted(layer.slots.trainable_slots())} != declared {sorted(declared)}"
        for role, factor in FACTOR_NAMES.items():
            wanted = adapter.generator.trainable_factors.get(factor, False)
            assert info[factor].role is role and info[factor].trainable == wanted, \
                f"{combo}: {name}: slot {factor} is not the {role.value} its generator declares (trainable={wanted})"
        values = layer.slots()
        for n in set(values) - declared:
            assert not values[n].requires_grad, \
                f"{combo}: {name}: frozen slot {n!r} is computed from trained parameters"
    before = {name: {n: v.detach().clone() for n, v in layer.slots().items()} for name, layer in layers.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        opt = torch.optim.Adam(params, lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            _loss(model, x).backward()
            opt.step()
    for name, layer in layers.items():
        after = layer.slots()
        frozen = set(after) - layer.slots.trainable_slots()
        for n in frozen:
            assert torch.equal(after[n], before[name][n]), f"{combo}: {name}: frozen slot {n!r} changed in training"


def train_aggressively(model: nn.Module, x: torch.Tensor, lr: float, steps: int = 10, seed: int = 0) -> bool:
    """Adam at a large learning rate towards a random target: factors drift in scale
    and direction as far as real training ever takes them. False if it diverged."""
    target = model(x).detach()
    target = target + 3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(seed),
                                      dtype=torch.float64).to(target.dtype)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - target).float().square().mean().backward()
        opt.step()
    return all(torch.isfinite(p).all() for p in model.parameters())


PRECISION_RTOL = 1e-5


def check_precision(combo: Combo, case: Case, lr: float) -> None:
    """fp32 after aggressive training computes what fp64 computes from the same values.

    Train the fp32 adapter; copy it to fp64 with each generator's (fp32) output kept
    as plain slots, so the comparison tests the update formula (normalizer, residual,
    magnitude, layer) and not the fp32 evaluation of a generator's own MLP. Every
    adapted layer gets the same input in both; the error must be within
    ``PRECISION_RTOL`` of the output's forward-error scale (:func:`_output_scale`).
    An update formula that cancels large terms (``B' − B0'`` after the scale drifted
    between ``B'`` and ``A'``) fails it by orders of magnitude.
    """
    case = dataclasses.replace(case, dtype=torch.float32)
    model, x = build_model(case)
    combo.adapter(case.rank, seed=case.seed).apply(model, targets=["0", "2"])
    if not any(p.requires_grad for p in model.parameters()) or not train_aggressively(model, x, lr, seed=case.seed):
        return
    model.eval()
    exact = freeze_generators(copy.deepcopy(model)).double()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, n=name: inputs.__setitem__(n, args[0]))
             for name, layer in adapted_layers(exact).items()]
    with torch.no_grad():
        exact(x.double())
        for h in hooks:
            h.remove()
        fp64 = adapted_layers(exact)
        for name, layer in adapted_layers(model).items():
            ref_layer, x_in = fp64[name], inputs[name]
            ref = ref_layer(x_in)
            if not torch.isfinite(ref).all():
                continue  # the trained adapter overflows even in fp64: nothing to compare
            err = (layer(x_in.float()).double() - ref).abs().max().item()
            scale = _output_scale(ref_layer, x_in)
            rtol = max(PRECISION_RTOL, 4 * torch.finfo(torch.float32).eps * _row_condition(ref_layer) ** 2)
            assert err <= rtol * scale, (
                f"{combo}: fp32 output of layer {name} after training at lr={lr} differs from fp64 "
                f"by {err:.3e} (output scale {scale:.3e}, rtol {rtol:.1e})")


def _output_scale(layer, x: torch.Tensor) -> float:
    """fp32's forward-error scale of the layer: an upper bound over rows and samples of

        |g_i| · (‖W̄_i‖ + Σ_k |B'_ik|·‖a'_k‖ + Σ_k |B0'_ik|·‖a0'_k‖) · ‖x‖ + |b_i|

    i.e. of evaluating ``W̄``, the live product ``B'A'`` and the initial one ``B0'A0'``
    each on its own. Cancellation inside ``B'A'`` (trained factors far larger than
    their product) is the factorization's own and is allowed; cancellation *between*
    the live and the initial terms, which a good residual form avoids, is not.
    """
    B, A = layer.normalizer.factors(layer.slots(), layer.rank)
    rows = layer.kind.matrix(layer.base).norm(dim=1) + B.abs() @ A.norm(dim=1)
    if layer.residual:
        rows = rows + layer.residual_B.abs() @ layer.residual_A.norm(dim=1)
    _, _, g = layer.factors()
    if g is not None:
        rows = rows * g.abs()
    bias = getattr(layer.base, "bias", None)
    b = 0.0 if bias is None else bias.abs().max().item()
    return rows.max().item() * x.flatten(1).norm(dim=1).max().item() + b + 1e-30


def _row_condition(layer) -> float:
    """``max_i ‖W̄_i‖ / ‖V_i‖`` for a layer with a magnitude head (1 without).

    A magnitude head divides by ``‖V_i‖`` computed by the low-rank identity
    (``functional.row_sq_norms_of_sum``), whose fp32 error grows as the square of
    this ratio: where training shrinks a row of ``V`` far below ``W̄``'s, ``‖V_i‖²``
    is a difference of large numbers. docs/design.md, "Precision", states the limit.
    """
    if layer.magnitude is None:
        return 1.0
    B, A, _ = layer.factors()
    W = layer.kind.matrix(layer.base)
    V_norm = (W + B @ A).norm(dim=1)
    return float((W.norm(dim=1) / V_norm.clamp_min(1e-300)).max().clamp_min(1.0))


AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
AUTOCAST_RTOL = 4  # × eps of the autocast dtype, elementwise, relative to _magnitude_scale
GRAD_RTOL = 16  # × eps of the autocast dtype × the gradient's fp32 condition, in norm


def check_autocast(combo: Combo, case: Case, dtype: torch.dtype = torch.bfloat16, compile_backend: str | None = None,
                   device: str = "cpu") -> None:
    """The fp32 adapted model trains and evaluates under ``torch.autocast(device, dtype)``
    as ``nn.Linear``/``nn.Conv*`` do there: the GEMMs with activations in ``dtype``, the
    adapter's parameters fp32 masters with fp32 gradients.

    1. Each adapted layer's output has the dtype its base module gives under autocast
       and is within ``AUTOCAST_RTOL·eps(dtype)`` of the fp64 output from the same
       values, elementwise, relative to the magnitude of what it sums,
       ``S = |g| ⊙ (|W̄||x| + |B'|(|A'||x|)) + |b|`` (:func:`_magnitude_scale`): rounding
       each operand and each GEMM's result to ``dtype`` (unit roundoff ``eps/2``) errs
       by a few ``eps/2·S``. In the autograd path (grad enabled) and the eval path
       (``no_grad``, cached factors).
    2. Training (dropout included): every trainable parameter gets a finite gradient in
       its own dtype, non-zero where fp64's is (and the dtype resolves it), within ``GRAD_RTOL·eps(dtype)·κ`` of fp64's
       in norm, ``κ = max(1, ‖g32 − g64‖ / (eps32·‖g64‖))`` the condition fp32 itself
       shows (DeLoRA's λ gradient is a sum that cancels to ~1e-5 of its terms); a
       gradient zero in exact arithmetic (fp64's below ``eps32·G``, ``G`` the largest
       gradient norm: a 1-wide DeLoRA direction) stays below ``GRAD_RTOL·eps·G``; with
       ``backward`` called outside the autocast region and inside it (where torch runs
       the backward of built-in ops in the autocast dtype too).
    3. ``merge`` inside an autocast region writes exactly what it writes outside.
    4. With ``compile_backend``: ``torch.compile(fullgraph=True)`` under autocast computes
       what eager does under autocast: outputs within ``AUTOCAST_RTOL·eps`` of their
       largest value, gradients as in 2.
    """
    case = dataclasses.replace(case, dtype=torch.float32)
    model, x = build_model(case, device)
    combo.adapter(case.rank, seed=case.seed, dropout=case.dropout, bias=case.bias).apply(model, targets=["0", "2"])
    perturb(model, case.seed)  # a non-zero update: at init B' = 0 for most initializers
    exact = freeze_generators(copy.deepcopy(model)).double().eval()
    x64 = x.double() if x.is_floating_point() else x
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps

    def autocast(on: bool = True):
        return torch.autocast(device, dtype=dtype, enabled=on)

    # 1. per layer, on the input the fp32 model gives it, against fp64 from the same values
    model.eval()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, n=name: inputs.__setitem__(n, args[0]))
             for name, layer in adapted_layers(model).items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name, layer in adapted_layers(model).items():
        x_in, ref_layer = inputs[name], adapted_layers(exact)[name]
        with torch.no_grad():
            x_ref = x_in.double() if x_in.is_floating_point() else x_in
            ref, scale = ref_layer(x_ref), _magnitude_scale(ref_layer, x_ref)
            with autocast():
                want = layer.base(x_in).dtype
        for grad in (True, False):
            with torch.set_grad_enabled(grad), autocast():
                out = layer(x_in)
            what = f"{combo}: {name} under autocast({dtype}, grad={grad})"
            assert out.dtype == want, f"{what}: output is {out.dtype}, the base module gives {want}"
            ratio = ((out.detach().double() - ref).abs() / (scale + 1e-300)).max().item() / eps
            assert ratio <= AUTOCAST_RTOL, f"{what}: differs from fp64 by {ratio:.2f}·eps of its magnitude"

    # 2. training: gradients reach every trainable parameter, in fp32, close to fp64's
    model.train()
    g64, g32 = _grads(copy.deepcopy(model).double(), x64), _grads(model, x)  # generators live: their gradients too
    G = max([g.double().norm().item() for g in g64.values()], default=0.0)

    def check_grad(what: str, n: str, g: torch.Tensor) -> None:
        ref = g64[n].double()
        if ref.norm() <= eps32 * G:  # zero in exact arithmetic: rounding noise only
            assert g.double().norm() <= GRAD_RTOL * eps * G, f"{what}: {g.norm():.2e}, fp64's is ~0 (largest {G:.2e})"
            return
        kappa = max(1.0, _rel(g32[n], ref) / eps32)
        err = _rel(g, ref) / eps
        assert err <= GRAD_RTOL * kappa, f"{what}: {err:.1f}·eps from fp64's in norm (κ = {kappa:.1f})"
        # non-zero wherever the dtype resolves it (a gradient fp32 gets only to within 100 % may round to 0)
        assert GRAD_RTOL * eps * kappa >= 1 or bool(g.abs().max() > 0), f"{what}: zero where fp64's is not"

    params = dict(model.named_parameters())
    for inside in (False, True):
        for n, g in _grads(model, x, autocast, inside).items():
            what = f"{combo}: gradient of {n} under autocast({dtype}), backward {'in' if inside else 'out'}side it"
            assert g is not None and g.dtype == params[n].dtype and torch.isfinite(g).all(), \
                f"{what}: missing, non-finite or not {params[n].dtype}"
            check_grad(what, n, g)

    # 3. merge inside autocast: the fp32 W_eff, as outside
    merged = []
    for on in (False, True):
        net = copy.deepcopy(model).eval()
        with autocast(on), torch.no_grad():
            merge(net)
        merged.append({n: layer.base.weight for n, layer in adapted_layers(net).items()})
    for n, W in merged[0].items():
        assert torch.equal(merged[1][n], W), f"{combo}: merge inside autocast({dtype}) writes another {n}"

    # 4. compiled = eager, under autocast
    if compile_backend is not None:
        torch._dynamo.reset()  # a fresh cache: one combination after another would reach the recompile limit
        compiled = torch.compile(copy.deepcopy(model), backend=compile_backend, fullgraph=True)
        model.eval()
        with autocast(), torch.no_grad():
            y_eager, y_comp = model(x), compiled.eval()(x)
        what = f"{combo}: compiled vs eager under autocast({dtype})"
        assert y_comp.dtype == y_eager.dtype, f"{what}: output dtype {y_comp.dtype} != {y_eager.dtype}"
        err = (y_comp.double() - y_eager.double()).abs().max().item() / (eps * (1 + y_eager.abs().max().item()))
        assert err <= AUTOCAST_RTOL, f"{what}: {err:.2f}·eps of the output's largest value"
        model.train()
        same_masks = case.dropout == 0 or compile_backend in ("eager", "aot_eager")  # inductor draws its own
        for n, g in _grads(compiled.train(), x, autocast).items():
            n = n.removeprefix("_orig_mod.")
            assert g is not None and torch.isfinite(g).all(), f"{what}: gradient of {n} missing or not finite"
            if same_masks:
                check_grad(f"{what}: gradient of {n}", n, g)


def _grads(net: nn.Module, x: torch.Tensor, autocast=None, inside: bool = False) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient of :func:`_loss`, forward under ``autocast()``
    if given, ``backward`` inside that region when ``inside``."""
    net.zero_grad(set_to_none=True)
    with autocast() if autocast else contextlib.nullcontext():
        loss = _loss(net, x)
        if inside:
            loss.backward()
    if not inside:
        loss.backward()
    got = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad(set_to_none=True)
    return got


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _magnitude_scale(layer, x: torch.Tensor) -> torch.Tensor:
    """Per output element, the magnitude of what the layer sums:

        S = |g| ⊙ (|W̄||x| + |B'|(|A'||x|)) + |b|

    with the factors ``factors()`` gives (the residual form's stacked ones), evaluated
    by the layer's own kind on absolute values (an embedding's indices as they are).
    Rounding every operand and GEMM result to a dtype of unit roundoff ``u`` errs by
    at most a few ``u·S``; this bounds it elementwise, cancellation included.
    """
    with torch.no_grad():
        B, A, g = layer.factors()
        base = copy.deepcopy(layer.base)
        for p in base.parameters():
            p.abs_()
        xa = x if layer.indices else x.abs()
        s = layer.kind.linear(base, xa) + layer.kind.lowrank(base, xa, B.abs(), A.abs())
        if g is not None:
            s = layer.kind.scale_rows(s, g.abs())
        return layer.kind.add_bias(base, s)


QUANTIZED_CASE = Case("linear", in_f=64, hidden=64, out_f=32, rank=4, dtype=torch.float32, batch=3, seed=0)


def check_quantized_base(combo: Combo, quantize, case: Case = QUANTIZED_CASE, exact_identity: bool = True) -> None:
    """The quantized-base properties for one combination (a frozen quantized base): ``quantize(model)``
    turns :func:`build_model`'s float layers into quantized ones in place (e.g.
    ``lambda m: lorakit.bitsandbytes.quantize(m, "nf4", skip=())``), deterministically.

    Identity at init is exact (bit for bit) with respect to the quantized model
    (``exact_identity=False``: to the compute dtype's resolution, for a bf16-compute
    base whose own forward adds the bias in bf16 where a magnitude head adds it after); only
    adapter slots get gradients; training never changes a byte of the frozen base
    (state dict, quantization state included); an in-place merge is refused and
    ``merge_and_unload`` gives float modules computing the adapted outputs; exported
    factors reproduce the update; save → load onto a freshly quantized model gives
    identical outputs.
    """
    from lorakit.core.model_ops import merge_and_unload
    from lorakit.core.primitives import MergeError

    def fresh():
        model, x = build_model(case)
        return quantize(model), x

    def snapshot(state):  # a tensor-subclass weight (torchao's) by its inner tensors: it may have no clone/equal
        return {f"{k}:{n}": t.clone() for k, v in state.items() for n, t in plain_tensors(v).items()}

    model, x = fresh()
    base_out = model(x)
    frozen = snapshot(model.state_dict())
    combo.adapter(case.rank, seed=case.seed).apply(model, targets=["0", "2"])
    if exact_identity:
        assert torch.equal(model(x), base_out), f"{combo}: identity at init on a quantized base is not exact"
    else:
        assert_close(model(x), base_out, torch.bfloat16, f"{combo}: identity at init on a quantized base")

    _loss(model, x).backward()
    for name, p in model.named_parameters():
        if ".base." in name:
            assert not p.requires_grad and p.grad is None, f"{combo}: base parameter {name} is trainable"
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        opt = torch.optim.AdamW(trainable, lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            _loss(model, x).backward()
            opt.step()
    after = snapshot({k.replace(".base.", ".", 1): v for k, v in model.state_dict().items() if ".base." in k})
    assert after.keys() == frozen.keys(), f"{combo}: the base's state dict keys changed"
    for k, v in frozen.items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), f"{combo}: training changed base {k}"

    with torch.no_grad():
        # the training-mode forward is the reference: an 8-bit layer's eval forward
        # quantizes its input too (LLM.int8()), which a float merged model does not
        y_train = model(x)
        model.eval()
        y = model(x)
        try:
            merge(model)
        except MergeError:
            pass
        else:
            raise AssertionError(f"{combo}: an in-place merge into a quantized weight was not refused")
        layers = adapted_layers(model)  # a head without DoRA's meaning exports folded: the float kit checks it
        plain = all(layer.magnitude is None or any(i.exported_as == DORA_MAGNITUDE for i in
                                                   layer.slots.slot_info.values()) for layer in layers.values())
        for name, exp in (export_factors(model) if plain else {}).items():
            layer = layers[name]
            B, A, _ = layer.factors()
            W = layer.kind.matrix(layer.base).double()
            assert_close(W + exp.B.double() @ exp.A.double(), W + B.double() @ A.double(), case.dtype,
                         f"{combo}: export of {name}", scale=10)
        with tempfile.TemporaryDirectory() as tmp:
            save(model, tmp)
            clone, _ = fresh()
            load(clone, tmp)
        if exact_identity:
            assert torch.equal(clone.eval()(x), y), f"{combo}: outputs differ after save/load on a quantized base"
        else:  # bitsandbytes casts a 4-bit layer's bias to the compute dtype in its first forward
            assert_close(clone.eval()(x), y, torch.bfloat16, f"{combo}: outputs after save/load")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged: Any = merge_and_unload(model)  # the caller's nn.Sequential
        assert all(type(m) is nn.Linear for m in (merged[0], merged[2])), f"{combo}: merge_and_unload kept quantized"
        dtype = merged[0].weight.dtype  # the compute dtype (a bf16-compute 4-bit base merges to bf16)
        assert_close(merged(x.to(dtype)), y_train, dtype, f"{combo}: merge_and_unload vs adapted", scale=10)
