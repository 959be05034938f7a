"""LDU initializer and learnable Scale (LoLDU, arXiv:2410.13618, §III): the
decomposition, the six init options, zero pivots (the pivoted LDU P W Q = L D U), and
the paper's parameter count."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorakit.core import Adapter, AdapterError, parameter_report
from lorakit.initializers import LDU
from lorakit.initializers.ldu import INITS
from lorakit.initializers.pivoted_ldu import complete_pivoting_ldu
from lorakit.normalizers import Scale

F64 = torch.float64


@pytest.mark.parametrize("shape", [(9, 9), (12, 7), (7, 12)])
def test_decomposition_matches_torch_lu(shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g, dtype=F64)
    k = min(shape)
    B0, d0, A0 = LDU().factors(W, k, 1.0, g)
    # full rank: P L D U reproduces W̄ exactly
    torch.testing.assert_close(B0 @ torch.diag(d0) @ A0, W, rtol=0, atol=1e-12)
    P, L, U = torch.linalg.lu(W)  # reference, with the dense permutation matrix
    torch.testing.assert_close(B0, P @ L, rtol=0, atol=0)
    torch.testing.assert_close(d0, U.diagonal(), rtol=0, atol=0)
    torch.testing.assert_close(A0, U / U.diagonal()[:, None], rtol=1e-14, atol=0)
    # unit-triangular factors
    assert torch.equal(torch.triu(A0), A0) and torch.equal(A0.diagonal(), torch.ones(k, dtype=F64))
    # top-r: the first r columns / rows / entries, divided by the normalizer's scale
    r, s = 3, 2.5
    B_r, d_r, A_r = LDU().factors(W, r, s, g)
    torch.testing.assert_close(B_r, B0[:, :r], rtol=0, atol=0)
    torch.testing.assert_close(A_r, A0[:r], rtol=0, atol=0)
    torch.testing.assert_close(s * d_r, d0[:r], rtol=1e-15, atol=0)


def test_init_options_values():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 16, generator=g, dtype=F64)
    r = 8
    D = LDU().factors(W, r, 1.0, g)[1]
    mean = D.mean()
    d = {init: LDU(init=init).factors(W, r, 2.0, torch.Generator().manual_seed(1))[1] for init in INITS}
    torch.testing.assert_close(d["lu"], D / 2)
    torch.testing.assert_close(d["constant"], (mean / 2).expand(r))
    assert torch.equal(d["ones"], torch.ones(r, dtype=F64)) and torch.equal(d["zeros"], torch.zeros(r, dtype=F64))
    assert (d["uniform"].abs() <= mean.abs() / 4).all() and d["uniform"].std() > 0  # U(±|μ|/2) / s
    assert not torch.allclose(d["normal"], d["constant"])
    many = LDU(init="normal").factors(torch.randn(400, 400, generator=g, dtype=F64), 400, 1.0, g)[1]
    Dm = LDU().factors(torch.randn(400, 400, generator=torch.Generator().manual_seed(5), dtype=F64), 400, 1.0, g)[1]
    assert many.shape == (400,) and torch.isfinite(many).all() and Dm.std() > 0
    with pytest.raises(AdapterError, match="init"):
        LDU(init="random")


def test_reference_code_variants():
    """The reference code's ``normal`` (Bessel-corrected σ_D) and its standard
    ``s_uniform`` U(−1, 1) / ``s_normal`` N(0, 1), literal (not divided by s)."""
    W = torch.randn(20, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    r, s = 8, 2.0
    D = LDU().factors(W, r, 1.0, torch.Generator())[1]
    draw = lambda init, **kw: LDU(init=init, **kw).factors(W, r, s, torch.Generator().manual_seed(3))[1]
    z = torch.randn(r, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(draw("normal"), (D.mean() + z * D.std(correction=0)) / s)
    torch.testing.assert_close(draw("normal", unbiased_std=True), (D.mean() + z * D.std(correction=1)) / s)
    torch.testing.assert_close(draw("s_normal"), z)
    u = torch.rand(r, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(draw("s_uniform"), 2 * u - 1)
    big = LDU(init="s_uniform").factors(torch.randn(300, 300, dtype=F64), 300, 1.0, torch.Generator())[1]
    assert big.abs().max() <= 1 and big.min() < -0.9 and big.max() > 0.9
    with pytest.raises(AdapterError, match="unbiased_std"):
        LDU(unbiased_std="yes")


def loldu_adapter(init="lu", rank=4, **kw):
    return Adapter(generator="diagonal", normalizer=Scale(learnable=True), init=LDU(init=init), rank=rank, **kw)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_every_init_is_identity_at_init(init, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 20)).to(dtype)
    x = torch.randn(5, 16, dtype=dtype)
    y0 = model(x)
    loldu_adapter(init).apply(model, targets=["0", "2"])
    tol = 1e-12 if dtype == F64 else 2e-5
    torch.testing.assert_close(model(x), y0, rtol=0, atol=tol)
    layer = model[0]
    assert layer.residual == (init != "zeros")  # a zero diagonal means ΔW(θ0) = 0 already
    model(x).square().sum().backward()  # and the diagonal and σ learn from there
    assert layer.slots.d.grad.abs().sum() > 0 and layer.slots.d.grad.isfinite().all()
    assert layer.slots.sigma.grad.isfinite().all()


def test_rank_deficient_weight_is_a_clear_error_and_model_unchanged():
    """Only a weight of numerical rank k < r has no rank-r LDU: the error names k and the
    fix, and nothing is half-applied."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(4, 2) @ torch.randn(2, 5))  # rank 2
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match=r"module '2'.*numerical rank 2 < rank 3.*use rank <= 2"):
        loldu_adapter(rank=3).apply(model, targets=["0", "2"])
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)  # nothing half-applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loldu_adapter(rank=2).apply(copy.deepcopy(model), targets=["0", "2"])  # rank(W̄) = 2 pivots exist
    zero = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        zero[0].weight.zero_()
    with pytest.raises(AdapterError, match=r"numerical rank 0 < rank 1.*leave this layer out"):
        loldu_adapter(rank=1).apply(zero, targets=["0"])


def check_pivoted(W, r):
    """``P W Q = L D U + [[0, 0], [0, S]]`` with unit-trapezoidal ``|L|, |U| <= 1``, and
    LDU's factors are that decomposition mapped back to W̄'s order."""
    tol = float(torch.finfo(W.dtype).eps * max(W.shape) * W.abs().max())
    L, D, U, rows, cols = complete_pivoting_ldu(W, r, tol)
    assert len(D) == r and (D.abs() > tol).all()
    assert torch.equal(torch.tril(L), L) and torch.equal(L.diagonal(), torch.ones(r, dtype=W.dtype))
    assert torch.equal(torch.triu(U), U) and torch.equal(U.diagonal(), torch.ones(r, dtype=W.dtype))
    assert L.abs().max() <= 1 and U.abs().max() <= 1
    PWQ = W[rows][:, cols]
    LDU_ = L @ torch.diag(D) @ U
    torch.testing.assert_close(LDU_[:r], PWQ[:r], rtol=0, atol=1e-12)  # the first r rows and
    torch.testing.assert_close(LDU_[:, :r], PWQ[:, :r], rtol=0, atol=1e-12)  # columns are exact
    B0, d0, A0 = LDU().decompose_pivoted(W, r, tol)
    torch.testing.assert_close(B0 @ torch.diag(d0) @ A0, W - (PWQ - LDU_)[torch.argsort(rows)][:, torch.argsort(cols)],
                               rtol=0, atol=1e-12)
    return B0, d0, A0


@given(out_f=st.integers(1, 9), in_f=st.integers(1, 9), data=st.data())
@settings(max_examples=60, deadline=None, derandomize=True)
def test_pivoted_ldu_every_weight_of_rank_at_least_r(out_f, in_f, data):
    """Random shapes with zero rows/columns and any rank: every r <= rank(W̄) works
    (P W̄ Q = L D U), and at r = rank(W̄) the LDU part is all of W̄."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    k = data.draw(st.integers(0, min(out_f, in_f)), label="rank(W)")
    W = torch.randn(out_f, k, generator=g, dtype=F64) @ torch.randn(k, in_f, generator=g, dtype=F64)
    W[data.draw(st.lists(st.integers(0, out_f - 1), max_size=2), label="zero rows")] = 0
    W[:, data.draw(st.lists(st.integers(0, in_f - 1), max_size=2), label="zero cols")] = 0
    k = int(torch.linalg.matrix_rank(W))
    if k == 0:
        with pytest.raises(AdapterError, match="numerical rank 0"):
            LDU().factors(W, 1, 1.0, g)
        return
    r = data.draw(st.integers(1, k), label="r")
    check_pivoted(W, r)
    B0, d0, A0 = check_pivoted(W, k)
    torch.testing.assert_close(B0 @ torch.diag(d0) @ A0, W, rtol=0, atol=1e-12)
    zero_cols = (W == 0).all(dim=0)
    assert not A0[:, zero_cols].any() and not B0[(W == 0).all(dim=1)].any()  # zero stays exactly zero
    if k < min(out_f, in_f):
        with pytest.raises(AdapterError, match=rf"numerical rank {k} < rank {k + 1}"):
            LDU().factors(W, k + 1, 1.0, g)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_zero_leading_column_is_identity_at_init(dtype):
    """A zero leading column (partial pivoting's pivot 0 is zero) at every rank up to
    min(out, in): the pivoted LDU, identity at init, trainable, no inf/NaN."""
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in ((5, 6), (6, 5), (6, 6)):
        model = nn.Sequential(nn.Linear(in_f, out_f)).to(dtype)
        with torch.no_grad():
            model[0].weight[:, 0] = 0
        x = torch.randn(3, in_f, generator=g, dtype=dtype)
        y0 = model(x)
        rank = min(out_f, in_f - 1)  # rank(W̄) with the zero column
        loldu_adapter(rank=rank).apply(model, targets=["0"])
        torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-12 if dtype == F64 else 2e-5)
        layer = model[0]
        assert not layer.residual_A[:, 0].any()  # the zero column takes no update direction
        model(x).square().sum().backward()
        assert layer.slots.d.grad.isfinite().all() and layer.slots.d.grad.abs().sum() > 0


def test_embedding_with_padding_row_zero():
    """``nn.Embedding(padding_idx=0)``: ``W̄ = weightᵀ`` has a zero leading column. LoLDU
    applies, is the identity at init, and the padding row stays bit-identical in training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 6, padding_idx=0))
    ids = torch.tensor([[0, 3, 5, 0, 11]])
    y0 = model(ids)
    Adapter.from_recipe("loldu", rank=6).apply(model, targets=["0"])
    torch.testing.assert_close(model(ids), y0, rtol=0, atol=2e-6)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        (model(ids) - 1).square().mean().backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0, 1], y0[0, 1])
        assert torch.equal(model(ids)[0, 0], y0[0, 0]) and not y0[0, 0].any()


def test_rectangular_weights_are_identity_and_exact():
    g = torch.Generator().manual_seed(3)
    for out_f, in_f in ((24, 10), (10, 24)):
        model = nn.Sequential(nn.Linear(in_f, out_f)).double()
        x = torch.randn(3, in_f, generator=g, dtype=F64)
        y0 = model(x)
        loldu_adapter(rank=min(out_f, in_f)).apply(model, targets=["0"])
        torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-12)
        layer = model[0]
        # at full rank the DSM is all of W̄: the residual weight W̄ − σ P L D U is ~0
        torch.testing.assert_close(layer.residual_B @ layer.residual_A, layer.base.weight, rtol=0, atol=1e-12)


class Bert(nn.Module):
    """The query/value projections of a 12-layer, hidden-768 encoder (RoBERTa-base / ViT-B)."""

    def __init__(self, layers=12, hidden=768):
        super().__init__()
        self.layer = nn.ModuleList(
            nn.ModuleDict({n: nn.Linear(hidden, hidden) for n in ("query", "value")}) for _ in range(layers))

    def forward(self, x):
        for block in self.layer:
            x = torch.tanh(block["query"](x) + block["value"](x)) / 2
        return x


def test_loldu_parameter_count_matches_paper():
    """12 layers x (query, value), 768x768, rank 768 (paper Tables I/IV):
    24·768 diagonal entries + 24 σ = 18,456 trainable parameters."""
    torch.manual_seed(0)
    with torch.no_grad():
        model = Bert()
    x = torch.randn(2, 768)
    y0 = model(x)
    Adapter.from_recipe("loldu", rank=768).apply(model, targets=["query", "value"])
    report = parameter_report(model)
    assert report["trainable"] == 18_456
    assert report["per_slot"] == {"d": 24 * 768, "sigma": 24}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 18_456
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-4)  # identity at init at full rank
    # paper defaults: rank = alpha, so σ0 = 1 and d0 = D_r
    layer = model.layer[0]["query"]
    assert layer.slots.sigma.item() == 1.0


def test_learnable_scale():
    """Scale(learnable=True): LoLDU's σ, a trainable scalar slot initialized to alpha/r."""
    W = torch.randn(6, 5, dtype=F64)
    for scale, expected in ((Scale(learnable=True), 1.0), (Scale(alpha=8, learnable=True), 2.0),
                            (Scale(alpha=8, rs=True, learnable=True), 4.0)):
        slots = scale.slots(W, 4)
        assert set(slots) == {"sigma"} and slots["sigma"].trainable and slots["sigma"].value.shape == ()
        assert slots["sigma"].value.item() == expected == scale.initial_scale(4)
        B, A, d = torch.randn(6, 4, dtype=F64), torch.randn(4, 5, dtype=F64), torch.randn(4, dtype=F64)
        sigma = torch.tensor(0.7, dtype=F64, requires_grad=True)
        Bp, Ap = scale.factors({"B": B, "A": A, "d": d, "sigma": sigma}, 4)
        torch.testing.assert_close(Bp @ Ap, 0.7 * B @ torch.diag(d) @ A)
        (Bp @ Ap).sum().backward()
        torch.testing.assert_close(sigma.grad, (B @ torch.diag(d) @ A).sum())
    assert Scale().slots(W, 4) == {}
    with pytest.raises(AdapterError, match="alpha"):
        Scale(alpha="8")
