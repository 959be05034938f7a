"""Meta-device build, then load: ``load`` on a model built on meta builds the
adapter's structure there (no initializer runs); after ``to_empty``, the base weights
and a second ``load``, the model computes what the saved one did (FSDP2's flow)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorakit.core import Adapter, AdapterError, adapted_layers, load, registry, save


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("recipe", sorted(registry.load().recipes))
def test_build_on_meta_then_load(tmp_path, recipe):
    torch.manual_seed(0)
    base = Net()
    model = Adapter.from_recipe(recipe, rank=2, bias="all").apply(copy.deepcopy(base), targets=["a", "b"])
    with torch.no_grad():  # "trained"
        for i, p in enumerate(q for q in model.parameters() if q.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    save(model, tmp_path / "ck")

    with torch.device("meta"):
        clone = Net()
    load(clone, tmp_path / "ck")
    assert set(adapted_layers(clone)) == {"a", "b"}
    assert all(t.is_meta for t in clone.parameters())
    clone.to_empty(device="cpu")
    # the base weights under the wrapped names (a -> a.base), as a sharded loader would map them
    clone.load_state_dict({k.replace(".", ".base.", 1): v for k, v in base.state_dict().items()}, strict=False)
    load(clone, tmp_path / "ck")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), model.eval()(x))


def test_plain_apply_on_meta_is_still_an_error():
    with torch.device("meta"):
        net = Net()
    with pytest.raises(AdapterError, match="meta device"):
        Adapter(rank=2).apply(net, targets=["a"])
