"""PiSSA initializer: principal part, PEFT's ``pissa`` as reference, rank-deficient
weights, deterministic low-rank SVD."""

import copy

import peft
import pytest
import torch
from torch import nn

from lorakit.core import Adapter, AdapterError
from lorakit.initializers import PiSSA
from lorakit.normalizers import Scale

F64 = torch.float64


def principal_part(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.mark.parametrize("normalizer", [Scale(), Scale(alpha=16), Scale(rs=True), Scale(alpha=-3.0),
                                        Scale(alpha=8, learnable=True)], ids=str)
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_scaled_product_is_the_principal_part(normalizer, shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g, dtype=F64)
    r = 4
    s = normalizer.initial_scale(r)
    B0, d0, A0 = PiSSA().factors(W, r, s, g)
    assert B0.shape == (shape[0], r) and A0.shape == (r, shape[1]) and torch.equal(d0, torch.ones(r, dtype=F64))
    torch.testing.assert_close(s * B0 @ A0, principal_part(W, r), rtol=0, atol=1e-12)
    # the normalizer's initial ΔW is that principal part too (so the residual is W̄'s tail)
    slots = {n: v.value for n, v in normalizer.slots(W, r).items()}
    Bp, Ap = normalizer.factors({"B": B0, "A": A0, "d": d0, **slots}, r)
    torch.testing.assert_close(Bp @ Ap, principal_part(W, r), rtol=0, atol=1e-12)


def test_matches_peft_pissa():
    """Same B0, A0 and residual weight as ``LoraConfig(init_lora_weights="pissa")``;
    same outputs after the same update."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 20))
    x = torch.randn(5, 16)
    ours = Adapter(normalizer=Scale(alpha=8), init=PiSSA(), rank=4).apply(copy.deepcopy(base), targets=["0", "2"])
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["0", "2"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    for i in ("0", "2"):
        layer, peft_layer = ours.get_submodule(i), theirs.base_model.model.get_submodule(i)
        torch.testing.assert_close(layer.slots.A, peft_layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.slots.B, peft_layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        W_res = layer.base.weight - layer.residual_B @ layer.residual_A
        torch.testing.assert_close(W_res, peft_layer.base_layer.weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in ("0", "2"):
            layer, peft_layer = ours.get_submodule(i), theirs.base_model.model.get_submodule(i)
            layer.slots.B.add_(0.3 * torch.randn(layer.slots.B.shape, generator=g))
            peft_layer.lora_B["default"].weight.copy_(layer.slots.B)
            peft_layer.lora_A["default"].weight.copy_(layer.slots.A)
    y = ours(x)
    assert (y - base(x)).abs().max() > 1e-2
    torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)


def test_rank_deficient_weight():
    """rank(W̄) = 2 < r = 4: the missing directions get zero factors, nothing breaks."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 2, generator=g, dtype=F64) @ torch.randn(2, 10, generator=g, dtype=F64))
    W = model[0].weight.detach().clone()
    x = torch.randn(6, 10, generator=g, dtype=F64)
    y0 = model(x)
    for svd in ("full", "lowrank"):
        m = Adapter(init=PiSSA(svd=svd), rank=4).apply(copy.deepcopy(model), targets=["0"])
        layer = m[0]
        assert torch.isfinite(layer.slots.A).all() and torch.isfinite(layer.slots.B).all()
        torch.testing.assert_close(layer.slots.B @ layer.slots.A, W, rtol=0, atol=1e-10)  # rank 2 ⊂ rank 4
        torch.testing.assert_close(m(x), y0, rtol=0, atol=1e-12)
        m(x).square().sum().backward()
        assert torch.isfinite(layer.slots.A.grad).all() and torch.isfinite(layer.slots.B.grad).all()
    zero = nn.Sequential(nn.Linear(5, 4, bias=False)).double()
    nn.init.zeros_(zero[0].weight)
    m = Adapter(init="pissa", rank=2).apply(zero, targets=["0"])  # rank 0: a LoRA with B0 = A0 = 0
    assert not m[0].residual and torch.equal(m(torch.ones(1, 5, dtype=F64)), torch.zeros(1, 4, dtype=F64))


def test_lowrank_is_deterministic_and_accurate():
    g = torch.Generator().manual_seed(0)
    # decaying spectrum, so the randomized range finder has something to find
    U, _ = torch.linalg.qr(torch.randn(60, 40, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(50, 40, generator=g, dtype=F64))
    W = U @ torch.diag(0.7 ** torch.arange(40, dtype=F64)) @ V.T
    state = torch.get_rng_state()
    first = PiSSA(svd="lowrank").factors(W, 5, 1.0, torch.Generator().manual_seed(7))
    again = PiSSA(svd="lowrank").factors(W, 5, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    B0, _, A0 = first
    exact = principal_part(W, 5)
    assert (B0 @ A0 - exact).norm() / exact.norm() < 1e-6
    other = PiSSA(svd="lowrank", niter=0).factors(W, 5, 1.0, torch.Generator().manual_seed(8))
    assert not torch.equal(other[0], B0)  # the draw depends on the seed


def test_bad_arguments_and_zero_scale():
    with pytest.raises(AdapterError, match="svd"):
        PiSSA(svd="randomized")
    with pytest.raises(AdapterError, match="niter"):
        PiSSA(niter=-1)
    model = nn.Sequential(nn.Linear(6, 6))
    weight = model[0].weight.detach().clone()
    with pytest.raises(AdapterError, match=r"module '0'.*non-zero initial scale"):
        Adapter(normalizer=Scale(alpha=0), init="pissa", rank=2).apply(model, targets=["0"])
    assert isinstance(model[0], nn.Linear) and torch.equal(model[0].weight, weight)  # unchanged
