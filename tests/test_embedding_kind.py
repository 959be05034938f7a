"""``nn.Embedding`` layer kind (issue 14): every recipe on a tiny Llama's
``embed_tokens`` is the identity at init, merges to what it computes unmerged, and
the PEFT export (``lora_embedding_A``/``lora_embedding_B``) reproduces it in PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_peft_export import tiny_llama
from torch import nn

from lorakit.core import Adapter, AdapterError, merge_and_unload, registry
from lorakit.transformers import export_peft

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model):
    return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_llama().eval()


@pytest.mark.parametrize("recipe", sorted(registry.load().recipes))
def test_every_recipe_on_embed_tokens(tmp_path, base, recipe):
    model = Adapter.from_recipe(recipe, rank=2, dropout=0.5).apply(copy.deepcopy(base), targets=["embed_tokens"])
    with torch.no_grad():
        torch.testing.assert_close(logits(model), logits(base), atol=1e-6, rtol=0)  # identity at init
    model.train()  # dropout never touches the integer ids: a training step runs
    logits(model).square().mean().backward()
    with torch.no_grad():  # "trained": move every trainable tensor
        for i, p in enumerate(q for q in model.parameters() if q.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    model.eval()
    with torch.no_grad():
        ours = logits(model)
        assert not torch.allclose(ours, logits(base))
        torch.testing.assert_close(logits(merge_and_unload(copy.deepcopy(model))), ours, atol=1e-5, rtol=1e-4)
    path = export_peft(model, tmp_path / "peft")
    keys = load_file(path / "adapter_model.safetensors")
    A, B = (keys[f"base_model.model.model.embed_tokens.lora_embedding_{f}"] for f in "AB")
    assert A.shape[1] == 64 and B.shape[0] == 16  # (r × num_embeddings), (embedding_dim × r)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(peft_model), ours, atol=1e-5, rtol=1e-4)


def test_embedding_errors():
    with pytest.raises(AdapterError, match="max_norm"):
        Adapter(rank=1).apply(nn.Sequential(nn.Embedding(8, 4, max_norm=1.0)), targets=["0"])
    model = Adapter(rank=1).apply(nn.Sequential(nn.Embedding(8, 4)), targets=["0"])
    from lorakit.diffusers import export_diffusers  # noqa: PLC0415 (only here)
    with pytest.raises(AdapterError, match="Embedding"):
        export_diffusers(model, "unused")
