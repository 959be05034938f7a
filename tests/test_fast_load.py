"""Fast load: ``load`` restores frozen slots and residual buffers
from the checkpoint instead of re-running the initializers (PiSSA's SVD per layer)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from lorakit.core import Adapter, adapted_layers, load, registry, save


def wide(layers=12, width=768):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def trained_and_saved(adapter: Adapter, base: nn.Module, path):
    """``adapter`` on a copy of ``base``, every trainable tensor moved off its initial value
    (so a load that re-ran the initializers would differ), saved at ``path``."""
    model = adapter.apply(copy.deepcopy(base), targets=r"\d+")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    save(model, path)
    return model


def best_of(n, fn):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("recipe", sorted(registry.load().recipes))
def test_load_runs_no_initializer(tmp_path, recipe, monkeypatch):
    """Every recipe: load builds the layers without calling the initializer, and the
    restored model (residual buffers included) computes what the saved one does."""
    base = wide(layers=2, width=16)
    model = Adapter.from_recipe(recipe, rank=4).apply(copy.deepcopy(base), targets=r"\d+")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    save(model, tmp_path / "ck")
    init = type(Adapter.from_recipe(recipe).init)

    def refuse(*args, **kwargs):
        raise AssertionError(f"load ran {init.__name__}.factors")

    monkeypatch.setattr(init, "factors", refuse)
    clone = load(copy.deepcopy(base), tmp_path / "ck")
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    assert {n: layer.residual for n, layer in adapted_layers(clone).items()} == \
        {n: layer.residual for n, layer in adapted_layers(model).items()}


@pytest.mark.slow
def test_load_skips_the_initializers(tmp_path):
    """The issue's measure: 12 layers 768 wide with PiSSA, load ≤ 0.1 × apply."""
    base = wide()
    adapter = Adapter.from_recipe("pissa", rank=8)
    model = trained_and_saved(adapter, base, tmp_path / "ck")
    t_apply = best_of(1, lambda: Adapter.from_recipe("pissa", rank=8).apply(copy.deepcopy(base), targets=r"\d+"))
    clones = []
    t_load = best_of(2, lambda: clones.append(load(copy.deepcopy(base), tmp_path / "ck")))
    t_copy = best_of(2, lambda: copy.deepcopy(base))  # both timings include one deepcopy
    assert t_load - t_copy <= 0.1 * (t_apply - t_copy) + 0.05, (t_apply, t_load, t_copy)
    x = torch.randn(3, 768)
    with torch.no_grad():
        assert torch.equal(clones[-1](x), model(x))
    assert all(layer.residual for layer in adapted_layers(clones[-1]).values())


@pytest.mark.parametrize("gain", [None, 4.0])
def test_load_skips_the_mlp_generators_init(tmp_path, gain, monkeypatch):
    """OP-LoRA: load builds the MLP with placeholders (MLP.build_for_load: no Kaiming draws,
    no eigenproblem for gain) and copies every tensor in: the state and outputs are the saved
    model's, bit for bit; a corrupt file leaves the model as it was."""
    from lorakit.generators import mlp

    base = wide(layers=2, width=16)
    adapter = Adapter.from_recipe("op-lora", rank=4, generator=mlp.MLP(width=8, embed_dim=16, gain=gain))
    model = trained_and_saved(adapter, base, tmp_path / "ck")

    def refuse(*args, **kwargs):
        raise AssertionError("load initialized the MLP")

    monkeypatch.setattr(mlp, "kaiming_uniform", refuse)
    monkeypatch.setattr(mlp, "jacobian_gram_max", refuse)
    clone = load(copy.deepcopy(base), tmp_path / "ck")
    saved, loaded = model.state_dict(), clone.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))

    from safetensors.torch import load_file, save_file

    weights = tmp_path / "ck" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("slots.W2"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    fresh = copy.deepcopy(base)
    with pytest.raises(Exception, match="non-finite"):
        load(fresh, tmp_path / "ck")
    assert not adapted_layers(fresh) and all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                                               base.state_dict().values()))
