"""A third-party magnitude head whose slot is not named ``m``, through the kit."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from lorakit_ia3 import IA3Gain
from torch import nn

from lorakit.core import Adapter, AdapterError, adapted_layers, export_factors, registry
from lorakit.core.conformance import cases, check_combination, combinations

EXAMPLES = int(os.environ.get("LORAKIT_CONFORMANCE_EXAMPLES", "3"))


def test_registered_through_the_entry_point():
    assert registry.primitive_class("magnitude", "ia3") is IA3Gain


@pytest.mark.parametrize("combo", combinations(include=[IA3Gain()]), ids=str)
@given(case=cases(max_dim=16))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_ia3_conforms(combo, case):
    check_combination(combo, case)


def test_gain_scales_rows_and_exports_only_folded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    Adapter(magnitude="ia3", rank=2).apply(model, targets=["0"])
    layer = adapted_layers(model)["0"]
    with torch.no_grad():
        layer.slots.gain.fill_(2.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), 2 * (x @ layer.base.weight.T))
    with pytest.raises(AdapterError, match="fold_magnitude=True"):
        export_factors(model)
    exp = export_factors(model, fold_magnitude=True)["0"]
    torch.testing.assert_close(exp.B @ exp.A, layer.base.weight.detach())  # W_eff − W̄ = (2 − 1)·W̄
