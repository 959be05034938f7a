"""``nn.Embedding`` layer kind: every recipe on a tiny Llama's
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


# -- padding_idx: the padding row's update stays exactly 0 --------------------------------
PAD = 5


def padded_llama(row: str):
    """The tiny Llama with ``pad_token_id=5``: ``embed_tokens.padding_idx = 5``, its row
    0 as transformers initializes it, or a nonzero (pretrained-looking) row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                         pad_token_id=PAD)).eval()
    embed = model.model.embed_tokens
    assert embed.padding_idx == PAD and not embed.weight[PAD].any()
    if row == "nonzero":
        with torch.no_grad():
            embed.weight[PAD] = torch.randn(16, generator=torch.Generator().manual_seed(4))
    return model


def sgd_steps(model, steps=20, lr=0.5):
    """Plain SGD towards a random target, on ids with padding tokens in them."""
    ids = IDS.clone()
    ids[:, -3:] = PAD
    target = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        (model(input_ids=ids).logits - target).square().mean().backward()
        opt.step()
    return model.eval()


def padding_row(model):
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor([PAD]))[0]


def bits(t):
    return t.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize("row", ["zero", "nonzero"])
@pytest.mark.parametrize("recipe", sorted(registry.load().recipes))
def test_padding_row_update_stays_zero(tmp_path, recipe, row):
    """After 20 SGD steps on ids holding the padding token, the padding row's output is the
    base row bit for bit, ``merge`` leaves it bit-identical, and PEFT's loader of the
    export computes the same (as PEFT's LoRA and full fine-tuning keep the row). A
    magnitude head scales the padding entry too (PEFT's DoRA does), so those recipes
    keep a nonzero row only up to ``g``: they run on the zero row."""
    adapter = Adapter.from_recipe(recipe, rank=2)
    if row == "nonzero" and adapter.magnitude is not None:
        pytest.skip("a magnitude head scales W̄'s padding entry by g, as PEFT's DoRA")
    base = padded_llama(row)
    expected = base.model.embed_tokens.weight[PAD].detach().clone()
    model = sgd_steps(adapter.apply(copy.deepcopy(base), targets=["embed_tokens"]))
    model.train()
    logits(model).square().mean().backward()  # IDS hold the padding token too
    layer = model.model.embed_tokens
    A = layer.slots.A if isinstance(getattr(layer.slots, "A", None), nn.Parameter) else None
    if A is not None and A.grad is not None and adapter.normalizer.name == "scale":  # DeLoRA reads A's row norms
        assert not A.grad[:, PAD].any()  # as PEFT: no gradient into A's padding column
    model.eval()
    assert not torch.equal(model.get_input_embeddings()(IDS), base.get_input_embeddings()(IDS))  # it trained
    assert torch.equal(bits(padding_row(model)), bits(expected))
    merged = merge_and_unload(copy.deepcopy(model))
    assert torch.equal(bits(merged.model.embed_tokens.weight[PAD]), bits(expected))
    path = export_peft(model, tmp_path / "peft")
    A = load_file(path / "adapter_model.safetensors")["base_model.model.model.embed_tokens.lora_embedding_A"]
    assert not A[:, PAD].any()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    assert torch.equal(bits(padding_row(peft_model)), bits(expected))
    with torch.no_grad():
        torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=1e-4)


def test_peft_and_full_finetuning_keep_the_padding_row():
    """The semantics matched above: PEFT's embedding LoRA and full fine-tuning, 20 SGD steps."""
    from peft import LoraConfig, get_peft_model

    base = padded_llama("nonzero")
    expected = base.model.embed_tokens.weight[PAD].detach().clone()
    peft_model = sgd_steps(get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["embed_tokens"])))
    assert torch.equal(bits(padding_row(peft_model)), bits(expected))
    full = copy.deepcopy(base)
    for p in full.parameters():
        p.requires_grad_(False)
    full.model.embed_tokens.weight.requires_grad_(True)
    sgd_steps(full)
    assert torch.equal(bits(full.model.embed_tokens.weight[PAD]), bits(expected))
