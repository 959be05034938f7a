"""OLoRA's own tests: its math, then the lorakit conformance kit crossed with every
registered generator, normalizer and magnitude head."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from lorakit_olora import OLoRA

from lorakit.conformance import cases, check_combination, combinations
from lorakit.core import Adapter, registry

# conformance examples per combination (tests/test_plugins_thirdparty.py runs 1 in CI)
EXAMPLES = int(os.environ.get("LORAKIT_CONFORMANCE_EXAMPLES", "3"))


def test_registered_through_the_entry_point():
    assert registry.primitive_class("initializer", "olora") is OLoRA
    assert registry.recipe("olora").init == {"name": "olora", "args": {}}


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_factors_are_the_leading_qr_components(shape, scale):
    W = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = 4
    B0, d0, A0 = OLoRA().factors(W, r, scale, torch.Generator())
    assert B0.shape == (shape[0], r) and A0.shape == (r, shape[1]) and torch.equal(d0, torch.ones(r).double())
    # orthonormal columns, untouched by the compensation
    torch.testing.assert_close(B0.T @ B0, torch.eye(r, dtype=torch.float64))
    # s·B0·A0 is the rank-r truncation of the QR (which is W̄ itself at full rank)
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(scale * B0 @ A0, Q[:, :r] @ R[:r])
    full = min(shape)
    B, _, A = OLoRA().factors(W, full, scale, torch.Generator())
    torch.testing.assert_close(scale * B @ A, W)
    # A0 is upper triangular in its leading block (R's structure)
    torch.testing.assert_close(A0[:, :r].tril(-1), torch.zeros(r, r, dtype=torch.float64))


def test_uncompensated_matches_peft_factors():
    W = torch.randn(10, 6, dtype=torch.float64)
    B0, _, A0 = OLoRA(compensate=False).factors(W, 3, 0.5, torch.Generator())
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(A0, R[:3])
    torch.testing.assert_close(B0, Q[:, :3])


def test_identity_at_init_and_the_update_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(8, 16)
    y0 = model(x).detach()
    Adapter.from_recipe("olora", rank=4).apply(model, targets=["0", "2"])
    torch.testing.assert_close(model(x), y0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    assert model(x).square().mean() < loss  # B0 ≠ 0: both factors get a gradient at step 0


def test_zero_scale_is_a_clear_error():
    with pytest.raises(Exception, match="initial scale is 0"):
        OLoRA().factors(torch.randn(4, 4), 2, 0.0, torch.Generator())


@pytest.mark.parametrize("combo", combinations(include=[OLoRA()]), ids=str)
@given(case=cases(max_dim=24))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_conformance(combo, case):
    check_combination(combo, case)
