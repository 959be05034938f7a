"""DeLoRA normalizer (DeLoRA, arXiv:2503.18225, Eq. 5–9, 15): the norm bound, zero-norm
factors, PEFT's ``delora`` as reference, and the official code's pitfalls."""

import copy

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorakit.core import Adapter, AdapterError, adapted_layers, merge, unmerge
from lorakit.initializers import Kaiming
from lorakit.normalizers import DeLoRA

F64 = torch.float64


def tiny_model(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 20)).to(dtype)


def dense_reference(B, d, A, lam, w, eps):
    """``(λ/r) Σ_i d_i b_i a_iᵀ diag(w) / (max(‖b_i‖,eps) max(‖a_i‖,eps))`` term by term."""
    r = A.shape[0]
    total = torch.zeros(B.shape[0], A.shape[1], dtype=B.dtype)
    for i in range(r):
        xi = 1.0 / (max(B[:, i].norm().item(), eps) * max(A[i].norm().item(), eps))
        total += d[i] * xi * torch.outer(B[:, i], A[i] * w)
    return lam / r * total


@st.composite
def delora_case(draw):
    out_f, in_f = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    r = draw(st.integers(1, min(out_f, in_f)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3]))  # tiny factors exercise the eps clamp
    B = torch.randn(out_f, r, generator=g, dtype=F64) * scale
    A = torch.randn(r, in_f, generator=g, dtype=F64) * draw(st.sampled_from([1e-6, 1.0, 10.0]))
    zero_b = draw(st.lists(st.integers(0, r - 1), max_size=r))
    zero_a = draw(st.lists(st.integers(0, r - 1), max_size=r))
    B[:, zero_b] = 0
    A[zero_a] = 0
    d = torch.randn(r, generator=g, dtype=F64) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    W = torch.randn(out_f, in_f, generator=g, dtype=F64) * draw(st.sampled_from([0.01, 1.0, 30.0]))
    lam = draw(st.floats(-50, 50, allow_nan=False))
    norm = draw(st.sampled_from(["column", "frobenius"]))
    return W, B, d, A, lam, norm, r


@given(delora_case())
@settings(max_examples=150, deadline=None)
def test_norm_bound_and_formula(case):
    """‖ΔW‖_F ≤ |λ|·max_j w_j·max_i |d_i|, and ΔW is exactly Eq. 15's update."""
    W, B, d, A, lam, norm, r = case
    normalizer = DeLoRA(lambda0=lam, weight_norm=norm)
    s = {name: slot.value for name, slot in normalizer.slots(W, r).items()}
    s.update(B=B, A=A, d=d)
    Bp, Ap = normalizer.factors(s, r)
    assert Bp.shape == B.shape and Ap.shape == A.shape  # low-rank form, nothing out × in
    delta = Bp @ Ap
    assert torch.isfinite(delta).all()

    w = W.norm(dim=0) if norm == "column" else W.norm().expand(W.shape[1])
    torch.testing.assert_close(s["w_norm"].expand(W.shape[1]), w, rtol=1e-12, atol=0)
    ref = dense_reference(B, d, A, lam, w, normalizer.eps)
    torch.testing.assert_close(delta, ref, rtol=1e-9, atol=1e-12 * (1 + ref.abs().max().item()))

    bound = abs(lam) * w.max().item() * d.abs().max().item()
    assert delta.norm().item() <= bound * (1 + 1e-9) + 1e-300


def test_bound_is_attained():
    """The bound is tight (so the property above can fail): r equal rank-1 terms."""
    r, n = 3, 5
    B = torch.zeros(n, r, dtype=F64)
    A = torch.zeros(r, n, dtype=F64)
    B[0], A[:, 0] = 2.0, 3.0  # every term is e_0 e_0ᵀ, unnormalized scale 6
    W = torch.eye(n, dtype=F64) * 4  # column norms all 4
    normalizer = DeLoRA(lambda0=7.0)
    s = {name: slot.value for name, slot in normalizer.slots(W, r).items()}
    s.update(B=B, A=A, d=torch.ones(r, dtype=F64))
    Bp, Ap = normalizer.factors(s, r)
    assert (Bp @ Ap).norm().item() == pytest.approx(7.0 * 4.0)


def test_zero_norm_factors_are_finite_in_value_and_gradient():
    torch.manual_seed(0)
    normalizer = DeLoRA()
    W = torch.randn(6, 5, dtype=F64)
    B = torch.randn(6, 3, dtype=F64)
    A = torch.randn(3, 5, dtype=F64)
    B[:, 1] = 0  # a zero column of B
    A[2] = 0  # a zero row of A
    B = B.requires_grad_()
    A = A.requires_grad_()
    s = {name: slot.value for name, slot in normalizer.slots(W, 3).items()}
    lam = s["lambda_"].clone().requires_grad_()
    s.update(B=B, A=A, d=torch.ones(3, dtype=F64), lambda_=lam)
    Bp, Ap = normalizer.factors(s, 3)
    (Bp @ Ap).square().sum().backward()
    for t in (Bp, Ap, B.grad, A.grad, lam.grad):
        assert torch.isfinite(t).all()
    # all-zero factors (PEFT's B0 = 0 start): ΔW = 0 and finite gradients
    B0 = torch.zeros(6, 3, dtype=F64, requires_grad=True)
    s.update(B=B0)
    Bp, Ap = normalizer.factors(s, 3)
    assert torch.equal(Bp @ Ap, torch.zeros(6, 5, dtype=F64))
    (Bp @ Ap + W).square().sum().backward()
    assert torch.isfinite(B0.grad).all() and B0.grad.abs().sum() > 0


def test_zero_norm_through_a_model():
    model = tiny_model()
    x = torch.randn(4, 16, dtype=F64)
    Adapter(normalizer="delora", init="kaiming", rank=4).apply(model, targets=["0", "2"])
    with torch.no_grad():
        model[0].slots.A[1] = 0
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all(), name


def test_recipe_composition_and_slots():
    model = tiny_model()
    W = model[0].weight.detach().clone()
    x = torch.randn(3, 16, dtype=F64)
    y0 = model(x)
    adapter = Adapter.from_recipe("delora", rank=4)
    assert adapter.init == Kaiming(zero_b=False) and adapter.normalizer == DeLoRA()
    adapter.apply(model, targets=["0", "2"])
    layer = model[0]
    assert layer.residual  # both factors Kaiming: Eq. 9's frozen copy is subtracted
    slots = dict(layer.slots.named_parameters())
    assert set(slots) == {"A", "B", "lambda_"}
    # a scalar slot: stored as (1,) for FSDP2, seen by the math as 0-dim
    assert slots["lambda_"].shape == (1,) and layer.slots()["lambda_"].shape == ()
    assert slots["lambda_"].item() == 15.0  # PEFT's default
    torch.testing.assert_close(layer.slots.w_norm, W.norm(dim=0), rtol=1e-12, atol=0)
    assert not any(b is layer.slots.w_norm for b in layer.slots.parameters())  # a frozen buffer
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-12)  # identity at init
    with pytest.raises(AdapterError, match="weight_norm"):
        DeLoRA(weight_norm="rows")
    with pytest.raises(AdapterError, match="eps"):
        DeLoRA(eps=0)
    frob = Adapter(normalizer=DeLoRA(weight_norm="frobenius"), init=Kaiming(zero_b=False), rank=2)
    other = frob.apply(tiny_model(), targets=["0"])
    assert other[0].slots.w_norm.shape == ()
    torch.testing.assert_close(other[0].slots.w_norm, W.norm(), rtol=1e-12, atol=0)


def test_matches_peft_delora():
    """PEFT's ``delora`` (B0 = 0, no residual) is ``DeLoRA() + Kaiming()``: copy A, B, λ
    in, train-like perturbation, same outputs and same gradients."""
    base = tiny_model()
    ours = Adapter(normalizer=DeLoRA(lambda0=15), init=Kaiming(), rank=4).apply(
        copy.deepcopy(base), targets=["0", "2"])
    theirs = peft.get_peft_model(copy.deepcopy(base),
                                 peft.DeloraConfig(r=4, delora_lambda=15, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in ("0", "2"):
            slots = ours.get_submodule(i).slots
            slots.B.copy_(torch.randn(slots.B.shape, generator=g, dtype=F64))
            slots.lambda_.fill_(3.5)
            peft_layer = theirs.base_model.model.get_submodule(i)
            peft_layer.delora_A["default"].copy_(slots.A)
            peft_layer.delora_B["default"].copy_(slots.B)
            peft_layer.delora_lambda["default"].fill_(3.5)
    x = torch.randn(5, 16, dtype=F64, generator=g)
    y_ours, y_theirs = ours(x), theirs(x)
    assert (y_ours - base(x)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-12, atol=1e-12)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for i in ("0", "2"):
        slots = ours.get_submodule(i).slots
        peft_layer = theirs.base_model.model.get_submodule(i)
        torch.testing.assert_close(slots.A.grad, peft_layer.delora_A["default"].grad)
        torch.testing.assert_close(slots.B.grad, peft_layer.delora_B["default"].grad)
        torch.testing.assert_close(slots.lambda_.grad.reshape(1), peft_layer.delora_lambda["default"].grad)


def train(model, x, steps=3, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_frozen_copy_does_not_follow_training():
    """The official code aliased the frozen initial copy with the live parameter;
    core keeps a clone: training moves B, A, λ but never the residual factors."""
    model = tiny_model()
    x = torch.randn(4, 16, dtype=F64)
    Adapter.from_recipe("delora", rank=4).apply(model, targets=["0", "2"])
    before = {n: (layer.residual_B.clone(), layer.residual_A.clone(), layer.slots.B.detach().clone(),
                  layer.slots.lambda_.detach().clone()) for n, layer in adapted_layers(model).items()}
    for layer in adapted_layers(model).values():
        assert layer.residual_B.data_ptr() != layer.slots.B.data_ptr()
        assert layer.residual_A.data_ptr() != layer.slots.A.data_ptr()
    train(model, x)
    for name, layer in adapted_layers(model).items():
        rB, rA, B, lam = before[name]
        assert not torch.equal(layer.slots.B, B) and not torch.equal(layer.slots.lambda_, lam)
        assert torch.equal(layer.residual_B, rB) and torch.equal(layer.residual_A, rA)


def test_merge_unmerge_round_trip():
    """Core's unmerge is the exact inverse (the official code's is not)."""
    model = tiny_model()
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 16, dtype=F64)
    Adapter.from_recipe("delora", rank=4).apply(model, targets=["0", "2"])
    train(model, x)
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert (y - nn.Sequential(*[copy.deepcopy(m) for m in (model[0].base, model[1], model[2].base)])(x)
                ).abs().max() > 1e-3  # trained: the merge below has something to fold
        for _ in range(3):  # repeated round trips do not drift
            merge(model)
            torch.testing.assert_close(model(x), y, rtol=0, atol=1e-12)
            unmerge(model)
            for name in ("0", "2"):
                torch.testing.assert_close(model.get_submodule(name).base.weight, pristine[f"{name}.weight"],
                                           rtol=0, atol=1e-13)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-13)


def _delora_combos():
    """Every registered combination with DeLoRA, plus the ``delora`` recipe (both
    factors Kaiming, residualized) under every generator."""
    from dataclasses import replace

    from lorakit.conformance import combinations
    from lorakit.core.plugins import registry

    combos = [c for c in combinations() if c.normalizer["name"] == "delora" and c.magnitude is None]
    recipe = next(c for c in combos if c.init["args"].get("zero_b") is False)
    generators = sorted(registry.load().primitives["generator"])
    combos += [replace(recipe, generator={"name": g, "args": {}}) for g in generators if g != recipe.generator["name"]]
    return combos


DELORA_COMBOS = _delora_combos()


@pytest.mark.parametrize("combo", DELORA_COMBOS, ids=str)
@given(seed=st.integers(0, 2**16), lr=st.sampled_from([0.1, 1.0, 10.0]))
@settings(max_examples=3, deadline=None)
def test_bound_holds_after_aggressive_fp32_training(combo, seed, lr):
    """The update a layer *applies* in fp32 (``B_cat A_cat`` of the residual form)
    stays within ``|λ|·max w·max|d| + ‖B0'A0'‖`` for every generator and initializer,
    however far training drifts the scale of the factors (the MLP generator moves
    ‖a_i‖ by 1e6 in a few steps at lr 1)."""
    from lorakit.conformance import train_aggressively

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 12))
    x = torch.randn(32, 24)
    combo.adapter(4, seed=seed).apply(model, targets=["0", "2"])
    if not train_aggressively(model, x, lr, seed=seed):
        return
    with torch.no_grad():
        for name, layer in adapted_layers(model).items():
            s = layer.slots()
            B, A, _ = layer.factors()
            applied = (B.double() @ A.double()).norm().item()
            bound = abs(s["lambda_"].item()) * s["w_norm"].max().item() * s["d"].abs().max().item()
            if layer.residual:
                bound += (layer.residual_B.double() @ layer.residual_A.double()).norm().item()
            assert applied <= bound * (1 + 1e-5), f"{combo} {name}: applied update {applied:.4g} > bound {bound:.4g}"


@pytest.mark.parametrize("c", [1e2, 2e4, 1e7])
def test_scale_split_changes_nothing_in_fp32(c):
    """DeLoRA is invariant to the scale of A (each row is normalized; likewise B's
    columns, down to ``eps``); training exploits it. The fp32 output and the applied
    update must not move (the residual form before the
    fix moved the output by 7.8e-3 at c = 2e4 and broke the bound at c = 1e7)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32))
    x = torch.randn(16, 64)
    Adapter.from_recipe("delora", rank=8).apply(model, targets=["0", "2"])
    with torch.no_grad():
        for layer in adapted_layers(model).values():  # move away from init first
            layer.slots.A.mul_(1.3).add_(0.05 * torch.randn_like(layer.slots.A))
        before = model(x)
        exact = copy.deepcopy(model).double()(x.double())
        for layer in adapted_layers(model).values():
            layer.slots.A.mul_(c)
        after = model(x)
        assert (after - before).abs().max() / before.abs().max() < 1e-5
        assert (after.double() - exact).abs().max() / exact.abs().max() < 1e-5
        for layer in adapted_layers(model).values():
            s = layer.slots()
            B, A, _ = layer.factors()
            bound = abs(s["lambda_"].item()) * s["w_norm"].max().item() + (
                layer.residual_B.double() @ layer.residual_A.double()).norm().item()
            assert (B.double() @ A.double()).norm().item() <= bound * (1 + 1e-5)


@pytest.mark.parametrize("generator", ["direct", "mlp"])
def test_live_lambda_residual_is_the_official_codes(tmp_path, generator):
    """``residual_lambda="live"``: ``ΔW = λ(N − N0)`` (the official code) instead of
    Eq. 9's ``λN − λ0N0``; identity at init, the formula and its bound after training
    (λ, B, A moved), a checkpoint round trip, and no change to the default."""
    from lorakit.core import load, save

    x = torch.randn(4, 16, dtype=F64)
    models = {}
    for variant in ("initial", "live"):
        model = tiny_model()
        y0 = model(x)
        Adapter(generator=generator, normalizer=DeLoRA(lambda0=3.0, residual_lambda=variant),
                init=Kaiming(zero_b=False), rank=4, seed=1).apply(model, targets=["0", "2"])
        torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-12)
        models[variant] = model
    live = models["live"]
    layer = live[0]
    n0B, n0A = layer.slots()["n0_B"].clone(), layer.slots()["n0_A"].clone()  # N0 = n0B·n0A / r
    assert n0B.abs().sum() > 0 and n0A.abs().sum() > 0
    for model in models.values():
        train(model, x, steps=4, lr=0.3)
        with torch.no_grad():  # at init ∂ΔW/∂λ = N − N0 = 0 under "live": move λ by hand too
            for name, p in model.named_parameters():
                if name.endswith("lambda_"):
                    p.add_(1.5)
    s = layer.slots()
    lam = s["lambda_"]
    assert torch.equal(s["n0_B"], n0B) and torch.equal(s["n0_A"], n0A)  # frozen after the first call
    W = layer.base.weight
    with torch.no_grad():
        N = dense_reference(s["B"], s["d"], s["A"], 1.0, s["w_norm"], 1e-4)
        torch.testing.assert_close(layer.effective_weight() - W, lam * (N - n0B @ n0A / 4), rtol=1e-10, atol=1e-12)
        bound = lam.abs() * s["w_norm"].max() * 2  # d = d0 = 1 under direct
        assert (layer.effective_weight() - W).norm() <= bound * (1 + 1e-9)
        paper = models["initial"][0]
        sp = paper.slots()
        Np = dense_reference(sp["B"], sp["d"], sp["A"], 1.0, sp["w_norm"], 1e-4)
        # Eq. 9: λN − λ0N0 (N0 from core's frozen residual, = λ0 N0)
        torch.testing.assert_close(paper.effective_weight() - paper.base.weight,
                                   sp["lambda_"] * Np - paper.residual_B @ paper.residual_A, rtol=1e-10, atol=1e-12)
    save(live, tmp_path / "ck")
    fresh = load(tiny_model(), tmp_path / "ck")
    torch.testing.assert_close(fresh(x), live(x), rtol=0, atol=1e-12)
    assert torch.equal(fresh[0].slots()["n0_B"], n0B)
    with pytest.raises(AdapterError, match="residual_lambda"):
        DeLoRA(residual_lambda="code")


def test_factors_only_read_their_slots():
    """``factors()`` is a function of the slots: under ``residual_lambda="live"`` the initial
    directions N0 are frozen slots computed at construction, never written by a forward."""
    model = tiny_model()
    Adapter(normalizer=DeLoRA(residual_lambda="live"), init=Kaiming(zero_b=False), rank=4, seed=1).apply(
        model, targets=["0"])
    layer = model[0]
    tensors = [*layer.slots.parameters(), *layer.slots.buffers()]
    versions = [t._version for t in tensors]
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            layer.normalizer.factors(layer.slots(), layer.rank)
            model(torch.randn(2, 16, dtype=F64))
    assert [t._version for t in tensors] == versions
    assert float(layer.slots()["n0_set"]) == 1.0  # kept so that older checkpoints keep their keys
