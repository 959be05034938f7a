"""Layer kinds: ``nn.Conv1d`` and ``nn.Conv3d`` next to
``Conv2d``: every recipe passes the conformance kit on them, and PEFT's loader
reproduces the outputs of the exported adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from lorakit.conformance import Case, Combo, check_combination
from lorakit.core import Adapter, AdapterError, registry
from lorakit.transformers import export_peft

RECIPES = sorted(registry.load().recipes)
DIMS = {"conv1d": 1, "conv3d": 3}


@pytest.mark.parametrize("layer", list(DIMS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_kit_on_conv1d_and_conv3d(recipe, layer):
    combo = Combo(**registry.recipe(recipe).composition())
    check_combination(combo, Case(layer, in_f=3, hidden=6, out_f=4, rank=2, dtype=torch.float64, batch=2, seed=1,
                                  dropout=0.25))


class Net(nn.Module):
    def __init__(self, dims):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.a, self.b = conv(3, 6, 3, padding=1, stride=2), conv(6, 4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("layer", list(DIMS))
@pytest.mark.parametrize("recipe", ["lora", "dora", "pissa", "op-lora", "delora"])
def test_peft_loads_conv1d_and_conv3d(tmp_path, recipe, layer):
    torch.manual_seed(0)
    base = Net(DIMS[layer]).eval()
    model = Adapter.from_recipe(recipe, rank=2).apply(copy.deepcopy(base), targets=["a", "b"])
    with torch.no_grad():
        for i, p in enumerate(q for q in model.parameters() if q.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    x = torch.randn(2, 3, *(6,) * DIMS[layer])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), export_peft(model.eval(), tmp_path / "p")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), atol=1e-5, rtol=1e-4)


def test_grouped_conv_is_a_clear_error():
    with pytest.raises(AdapterError, match="grouped"):
        Adapter(rank=1).apply(nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)), targets=["0"])
