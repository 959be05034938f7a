"""Bias training: ``bias="all"`` trains every bias (PEFT's "all"),
``"adapted"`` those of the adapted layers (PEFT's "lora_only"); the native
checkpoint keeps them and PEFT's loader reproduces the outputs from the export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from test_peft_export import run, tiny_gpt2, tiny_llama
from test_targeting import tiny_model

from lorakit.core import Adapter, AdapterError, adapted_layers, load, registry, save
from lorakit.transformers import export_peft

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def train(model, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    target = torch.randn(run(model, IDS).shape, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        (run(model, IDS) - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_bias_modes_select_peft_sets():
    def chosen(mode):
        model = Adapter(rank=2, bias=mode).apply(tiny_model("bert"))
        return {n for n in trainable(model) if n.endswith("bias")}
    layers = adapted_layers(Adapter(rank=2).apply(tiny_model("bert")))
    assert chosen("none") == set()
    assert chosen("adapted") == {f"{n}.base.bias" for n in layers}
    every = {n for n, _ in tiny_model("bert").named_parameters() if n.endswith("bias")}
    assert len(chosen("all")) == len(every) and any("LayerNorm" in n for n in chosen("all"))
    with pytest.raises(AdapterError, match="bias"):
        Adapter(bias="lora_only")


@pytest.mark.parametrize("mode", ["all", "adapted"])
@pytest.mark.parametrize("recipe", sorted(registry.load().recipes))
def test_bias_checkpoint_round_trip(tmp_path, mode, recipe):
    base = tiny_gpt2()
    model = train(Adapter.from_recipe(recipe, rank=2, bias=mode).apply(copy.deepcopy(base)))
    biases = {n.replace(".base.", "."): p for n, p in model.named_parameters()
              if n.endswith("bias") and p.requires_grad}
    assert any(not torch.equal(p, base.get_parameter(n)) for n, p in biases.items()), "no bias trained"
    save(model, tmp_path / "ck")
    clone = load(copy.deepcopy(base), tmp_path / "ck").eval()
    assert trainable(clone) == trainable(model)
    with torch.no_grad():
        assert torch.equal(run(clone, IDS), run(model, IDS))


@pytest.mark.parametrize("mode", ["all", "adapted"])
@pytest.mark.parametrize("recipe", ["lora", "dora", "pissa", "op-lora"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_bias_peft_round_trip(tmp_path, mode, recipe, make):
    torch.manual_seed(0)
    base = make().eval()
    if make is tiny_llama:  # Llama has no biases; Qwen2's q/k/v projections have
        base = tiny_model("qwen2")
    model = train(Adapter.from_recipe(recipe, rank=2, bias=mode).apply(copy.deepcopy(base)))
    path = export_peft(model, tmp_path / "peft")
    assert json.loads((path / "adapter_config.json").read_text())["bias"] == {"all": "all",
                                                                              "adapted": "lora_only"}[mode]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        ours = run(model, IDS)
        assert not torch.allclose(ours, run(base, IDS))
        torch.testing.assert_close(run(peft_model, IDS), ours, atol=1e-5, rtol=1e-4)
