"""The eval-mode factor cache never serves stale factors.

``AdaptedLayer.factors()`` caches under ``eval()`` + ``no_grad`` (OP-LoRA's MLP runs
once, not once per forward), keyed on the version counter, storage and identity of
every tensor it reads. Anything that changes a parameter must show in the output.
"""

import copy

import pytest
import torch
from torch import nn

from lorakit.core import Adapter, adapted_layers

RECIPES = ["lora", "op-lora", "dora", "op-dora", "delora", "pissa", "loldu"]


def setup(recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    Adapter.from_recipe(recipe, rank=4).apply(model, targets=["0", "2"])
    x = torch.randn(5, 12)
    return model.eval(), x


def fresh(model, x):
    """The output recomputed without any cache (a deep copy in train mode)."""
    with torch.no_grad():
        return copy.deepcopy(model).train()(x)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("recipe", RECIPES)
def test_optimizer_steps_in_eval_mode_show(recipe):
    model, x = setup(recipe)
    opt = torch.optim.AdamW(trainable(model), lr=0.05)
    with torch.no_grad():
        first = model(x)  # fills the cache
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()  # eval mode, grad enabled
        opt.step()
    with torch.no_grad():
        after = model(x)
    assert not torch.equal(after, first)
    assert torch.equal(after, fresh(model, x))


@pytest.mark.parametrize("edit", ["add_", "copy_", "data", "ema", "load_state_dict", "replace"])
@pytest.mark.parametrize("recipe", ["op-lora", "dora"])
def test_every_kind_of_edit_shows(recipe, edit):
    model, x = setup(recipe)
    with torch.no_grad():
        model(x)
        p = trainable(model)[0]
        if edit == "add_":
            p.add_(0.1)
        elif edit == "copy_":
            p.copy_(p + 0.1)
        elif edit == "data":
            p.data = p.data + 0.1
        elif edit == "ema":  # weight averaging as torch.optim.swa_utils / EMA libraries do it
            for q in trainable(model):
                q.mul_(0.5).add_(torch.ones_like(q), alpha=0.5)
        elif edit == "load_state_dict":
            state = {k: v + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
            model.load_state_dict(state)
        else:
            layer = adapted_layers(model)["0"]
            layer.slots = copy.deepcopy(layer.slots)
            for q in layer.slots.parameters():
                q.add_(0.1)
        assert torch.equal(model(x), fresh(model, x))


def test_cache_is_used_when_nothing_changed():
    """The cache pays: with nothing changed, the generator's MLP is not run again."""
    model, x = setup("op-lora")
    calls = []
    for layer in adapted_layers(model).values():
        layer.slots.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(x)
        model(x)
        model(x)
    assert len(calls) == 2  # once per layer
