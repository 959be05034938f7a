"""A third-party magnitude head whose slot is not named ``m``, through the kit."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from lorakit_ia3 import IA3Gain
from torch import nn

from lorakit.conformance import cases, check_combination, combinations
from lorakit.core import Adapter, AdapterError, adapted_layers, export_factors, registry

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


def test_a_gain_keeps_no_row_norms_and_older_checkpoints_still_load(tmp_path):
    """The head declares it needs nothing from W̄ (``uses_row_norms = False``): core keeps no
    ``‖W̄_i‖²`` buffer for it. A checkpoint written when every head got one still loads."""
    from safetensors.torch import load_file, save_file

    from lorakit.core import load, save

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5))

    model = Adapter(magnitude=IA3Gain(), rank=2).apply(fresh(), targets=["0"])
    assert adapted_layers(model)["0"].row_sq_norm is None
    with torch.no_grad():
        adapted_layers(model)["0"].slots.gain.mul_(1.5)
    save(model, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    assert "0.row_sq_norm" not in tensors
    tensors["0.row_sq_norm"] = torch.ones(5)  # what the older version wrote
    save_file(tensors, str(file), metadata={"format": "pt"})
    x = torch.randn(3, 6)
    torch.testing.assert_close(load(fresh(), tmp_path)(x), model(x), rtol=0, atol=0)
