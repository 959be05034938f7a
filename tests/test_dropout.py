"""Adapter dropout: PEFT's ``lora_dropout`` — the adapter branch
sees ``drop(x)`` in training, nothing changes in eval, merge/export ignore it, the
native checkpoint and the PEFT export keep it, and PEFT's own loader computes the
same training-mode outputs (DoRA included) from the same random masks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from test_peft_export import run, tiny_gpt2, tiny_llama
from torch import nn

from lorakit.core import Adapter, AdapterError, adapted_layers, load, merge, registry, save, unmerge
from lorakit.transformers import export_peft

RECIPES = sorted(registry.load().recipes)
P = 0.3


def seeded(fn, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def moved(model):
    """Move every trainable parameter so the adapter is not the identity."""
    with torch.no_grad():
        for i, p in enumerate(q for q in model.parameters() if q.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype))
    return model


def block(conv=False):
    torch.manual_seed(0)
    if conv:
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 1))
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6))


@pytest.mark.parametrize("recipe", RECIPES)
def test_dropout_acts_in_training_only_and_merge_ignores_it(recipe):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    plain = moved(Adapter.from_recipe(recipe, rank=2).apply(block(), targets=["0", "2"]))
    dropped = moved(Adapter.from_recipe(recipe, rank=2, dropout=P).apply(block(), targets=["0", "2"]))
    plain.eval(), dropped.eval()
    with torch.no_grad():
        y = dropped(x)
        assert torch.equal(y, plain(x)), "dropout changed an eval output"
        merge(dropped)
        torch.testing.assert_close(dropped(x), y, atol=1e-5, rtol=1e-5)
        unmerge(dropped)
    dropped.train()
    a, b = seeded(lambda: dropped(x)), seeded(lambda: dropped(x), seed=1)
    assert not torch.allclose(a, b), "no dropout in training"
    assert torch.equal(a, seeded(lambda: dropped(x))), "same seed, different masks"


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
@pytest.mark.parametrize("recipe", ["lora", "pissa", "dora"])
def test_training_output_is_peft_formula(recipe, conv):
    """y = W̄x + b + ΔW drop(x); DoRA: y = W̄(x − x_d) + g ⊙ (W̄ x_d + ΔW x_d) + b."""
    model = moved(Adapter.from_recipe(recipe, rank=2, dropout=P).apply(block(conv), targets=["0"]))
    layer = adapted_layers(model)["0"]
    x = torch.randn(4, 3, 5, 5) if conv else torch.randn(4, 8)
    model.train()
    got = seeded(lambda: layer(x))
    x_d = seeded(lambda: torch.nn.functional.dropout(x, P))
    with torch.no_grad():
        B, A, g = layer.factors()
        kind, base = layer.kind, layer.base
        delta = kind.lowrank(base, x_d, B, A)
        if g is None:
            want = base(x) + delta
        else:
            want = kind.add_bias(base, kind.linear(base, x - x_d) + kind.scale_rows(kind.linear(base, x_d) + delta, g))
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)


def test_config_checkpoint_and_validation(tmp_path):
    adapter = Adapter.from_recipe("op-lora", rank=2, dropout=0.05)
    assert adapter.config()["dropout"] == 0.05
    assert Adapter.from_config(adapter.config()).dropout == 0.05
    model = adapter.apply(block(), targets=["0", "2"])
    save(model, tmp_path / "ck")
    clone = block()
    load(clone, tmp_path / "ck")
    assert {layer.dropout for layer in adapted_layers(clone).values()} == {0.05}
    # a checkpoint written before the field existed loads with no dropout
    config = json.loads((tmp_path / "ck" / "adapter_config.json").read_text())
    del config["adapter"]["dropout"]
    (tmp_path / "ck" / "adapter_config.json").write_text(json.dumps(config))
    old = block()
    load(old, tmp_path / "ck")
    assert {layer.dropout for layer in adapted_layers(old).values()} == {0.0}
    for bad in (1.0, -0.1, "0.1", True, float("nan")):
        with pytest.raises(AdapterError, match="dropout"):
            Adapter(dropout=bad)


@pytest.mark.parametrize("recipe", ["lora", "dora", "pissa", "op-lora"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_peft_export_writes_lora_dropout_and_peft_trains_the_same(tmp_path, recipe, make):
    torch.manual_seed(0)
    base = make().eval()
    model = moved(Adapter.from_recipe(recipe, rank=2, dropout=P).apply(copy.deepcopy(base)))
    path = export_peft(model.eval(), tmp_path / "peft")
    assert json.loads((path / "adapter_config.json").read_text())["lora_dropout"] == P
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(run(peft_model.eval(), ids), run(model, ids), atol=1e-5, rtol=1e-5)
        model.train(), peft_model.train()
        ours, theirs = seeded(lambda: run(model, ids)), seeded(lambda: run(peft_model, ids))
        assert not torch.allclose(ours, seeded(lambda: run(model, ids), seed=5)), "no dropout in training"
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
