"""modules_to_save: whole modules (classifier heads, ``score``,
``lm_head``, norms) trained as copies next to the adapter; the originals come back
with ``unload``/``disabled()``; the native checkpoint keeps the copies, and the PEFT
export loads in ``PeftModel.from_pretrained`` and transformers' ``load_adapter`` with
the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from test_peft_export import tiny_llama
from test_targeting import TINY
from transformers import AutoConfig, AutoModelForSequenceClassification

from lorakit.core import Adapter, AdapterError, adapted_layers, disabled, load, merge_and_unload, registry, save, unload
from lorakit.core.trained import SavedModule
from lorakit.transformers import export_peft

IDS = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def classifier(model_type="qwen2"):
    """A tiny sequence classifier (Qwen2's head is ``score``, BERT's ``classifier``)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY[model_type], num_labels=3)
    return AutoModelForSequenceClassification.from_config(config).eval()


def logits(model):
    return model(input_ids=IDS).logits


@pytest.mark.parametrize("recipe", sorted(registry.load().recipes))
def test_saved_module_trains_restores_and_round_trips(tmp_path, recipe):
    base = classifier()
    adapter = Adapter.from_recipe(recipe, rank=2, modules_to_save=["score", "norm"])
    model = adapter.apply(copy.deepcopy(base), targets="all-linear")
    assert isinstance(model.score, SavedModule) and model.score.weight is model.score.trained.weight
    assert "score" not in adapted_layers(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"score.trained.weight", "model.norm.trained.weight"} <= trainable
    assert not any(".original." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(2):
        logits(model).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        ours = logits(model)
        assert not torch.equal(model.score.trained.weight, base.score.weight)
        assert torch.equal(model.score.original.weight, base.score.weight)
        with disabled(model):
            torch.testing.assert_close(logits(model), logits(base))
    save(model, tmp_path / "ck")
    clone = load(copy.deepcopy(base), tmp_path / "ck").eval()
    with torch.no_grad():
        assert torch.equal(logits(clone), ours)
        assert torch.equal(logits(unload(copy.deepcopy(model))), logits(base))
        torch.testing.assert_close(logits(merge_and_unload(copy.deepcopy(model))), ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("recipe", ["lora", "dora", "pissa", "op-lora"])
@pytest.mark.parametrize("model_type", ["qwen2", "bert"])
def test_peft_and_transformers_load_the_saved_modules(tmp_path, recipe, model_type):
    base = classifier(model_type)
    head = "score" if model_type == "qwen2" else "classifier"
    model = Adapter.from_recipe(recipe, rank=2, modules_to_save=[head]).apply(copy.deepcopy(base))
    with torch.no_grad():  # "trained": move every trainable tensor, the head included
        for i, p in enumerate(q for q in model.parameters() if q.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        ours = logits(model)
        assert not torch.allclose(ours, logits(base))
    path = export_peft(model, tmp_path / "peft")
    assert json.loads((path / "adapter_config.json").read_text())["modules_to_save"] == [head]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    hf = copy.deepcopy(base)
    hf.load_adapter(str(path))
    with torch.no_grad():
        torch.testing.assert_close(logits(peft_model), ours, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits(hf.eval()), ours, atol=1e-5, rtol=1e-4)


def test_lm_head_and_errors():
    model = Adapter(rank=2, modules_to_save=["lm_head"]).apply(tiny_llama(), targets="all-linear")
    assert isinstance(model.lm_head, SavedModule) and model.lm_head.trained.weight.requires_grad
    with pytest.raises(AdapterError, match=r"modules_to_save=\['scor'\] match no module"):
        Adapter(rank=2, modules_to_save=["scor"]).apply(classifier())
    with pytest.raises(AdapterError, match="modules_to_save"):
        Adapter(modules_to_save=[1])
