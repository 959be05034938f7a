"""VeRA's own tests: Eq. (2), sharing, parameter count, then the conformance kit
crossed with every registered normalizer, initializer and magnitude head."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from lorakit_vera import SharedRandom, VeRA

from lorakit.conformance import cases, check_combination, combinations
from lorakit.core import Adapter, adapted_layers, parameter_report, registry


def model_and_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12),
                                torch.nn.Tanh(), torch.nn.Linear(12, 5))
    return model, torch.randn(6, 12)


# conformance examples per combination (tests/test_plugins_thirdparty.py runs 1 in CI)
EXAMPLES = int(os.environ.get("LORAKIT_CONFORMANCE_EXAMPLES", "3"))


def test_registered_through_the_entry_point():
    assert registry.primitive_class("generator", "vera") is VeRA
    assert registry.primitive_class("initializer", "shared-random") is SharedRandom
    assert registry.recipe("vera").generator == {"name": "vera", "args": {}}


def test_equation_2_and_zero_start():
    model, x = model_and_input()
    y0 = model(x).detach()
    Adapter.from_recipe("vera", rank=4, normalizer={"name": "scale", "args": {"alpha": 8}}).apply(
        model, targets=["0", "2", "4"])
    layer = adapted_layers(model)["2"]
    assert not layer.residual  # b0 = 0: ΔW(θ0) = 0, nothing to residualize
    torch.testing.assert_close(model(x), y0)
    with torch.no_grad():
        layer.slots.lambda_b.normal_()
        layer.slots.inner.d.normal_()
    b, d = layer.slots.lambda_b, layer.slots.inner.d
    A0, B0 = layer.slots.inner.A, layer.slots.inner.B
    expected = (8 / 4) * torch.diag(b) @ B0 @ torch.diag(d) @ A0  # s · Λ_b B Λ_d A
    W = layer.base.weight
    torch.testing.assert_close(layer.effective_weight(), W + expected)


def test_frozen_factors_are_shared_by_equal_shapes():
    model, _ = model_and_input()
    Adapter.from_recipe("vera", rank=4).apply(model, targets=["0", "2", "4"])
    layers = adapted_layers(model)
    assert torch.equal(layers["0"].slots.inner.A, layers["2"].slots.inner.A)
    assert torch.equal(layers["0"].slots.inner.B, layers["2"].slots.inner.B)
    assert torch.equal(layers["2"].slots.inner.A, layers["4"].slots.inner.A)  # same (r, in)
    assert not torch.equal(SharedRandom(seed=1).factors(torch.zeros(12, 12), 4, 1.0, None)[2],
                           layers["0"].slots.inner.A)  # the seed changes them
    # only d and lambda_b train: (r + out) per layer
    report = parameter_report(model)
    assert report["trainable"] == (4 + 12) + (4 + 12) + (4 + 5)
    assert set(report["per_slot"]) == {"d", "lambda_b"}


def test_vera_over_another_basis_is_a_valid_composition():
    model, x = model_and_input()
    y0 = model(x).detach()
    Adapter(generator={"name": "vera", "args": {"b_initial": 1.0}}, init="shared-random",
            rank=3).apply(model, targets=["0", "2"])
    assert adapted_layers(model)["0"].residual  # b0 = 1: non-zero start, residualized
    torch.testing.assert_close(model(x), y0)


@pytest.mark.parametrize("combo", combinations(include=[VeRA()]), ids=str)
@given(case=cases(max_dim=24))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_conformance_generator(combo, case):
    check_combination(combo, case)


@pytest.mark.parametrize("combo", [c for c in combinations(include=[SharedRandom()])
                                   if c.generator["name"] in ("direct", "vera")], ids=str)
@given(case=cases(max_dim=24))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_conformance_initializer(combo, case):
    check_combination(combo, case)
