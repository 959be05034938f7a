"""GPT-2 ``Conv1D`` orientation and the default targets registered per architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTModel,
)
from transformers.pytorch_utils import Conv1D

from lorakit.core import Adapter, AdapterError, adapted_layers, merge, registry, unmerge
from lorakit.transformers import Conv1DKind, peft_state_dict


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def test_conv1d_kind_is_registered_and_views_weight_as_out_by_in():
    conv = Conv1D(48, 16)  # nf=out=48, nx=in=16; weight stored 16 × 48
    kind = registry.load().layer_kind(conv)
    assert isinstance(kind, Conv1DKind)
    assert kind.matrix(conv).shape == (48, 16)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(kind.add_bias(conv, kind.linear(conv, x)), conv(x))


@pytest.mark.parametrize("name", ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                  "transformer.h.0.mlp.c_fc"])
def test_gpt2_conv1d_orientation(name):
    """Adapter math against an independent nn.Linear built from the transposed weight.
    attn.c_proj is square (16 × 16), where a transposition error would keep shapes."""
    model = tiny_gpt2()
    Adapter.from_recipe("lora", rank=3).apply(model, targets=[name.rsplit(".", 1)[-1]])
    layer = adapted_layers(model)[name]
    conv = layer.base
    W0 = conv.weight.detach().clone()
    out_f, in_f = W0.shape[1], W0.shape[0]
    assert layer.slots.A.shape == (3, in_f) and layer.slots.B.shape == (out_f, 3)
    with torch.no_grad():
        layer.slots.A.copy_(torch.randn(3, in_f))
        layer.slots.B.copy_(torch.randn(out_f, 3))
    delta = layer.slots.B.detach() @ layer.slots.A.detach()  # out × in
    reference = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        reference.weight.copy_(W0.T + delta)
        reference.bias.copy_(conv.bias)
    x = torch.randn(2, 4, in_f)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
        merge(model)
        torch.testing.assert_close(conv.weight, (W0.T + delta).T, rtol=1e-6, atol=1e-6)  # stored in × out
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
        unmerge(model)
        torch.testing.assert_close(conv.weight, W0, rtol=0, atol=1e-6)
    tensors, config = peft_state_dict(model, prefix="")
    assert config["fan_in_fan_out"] is True  # PEFT reads Conv1D weights transposed
    torch.testing.assert_close(tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"], delta,
                               rtol=1e-5, atol=1e-5)


def _llama_like(config_cls, model_cls):
    return model_cls(config_cls(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1))


LLAMA = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
BERT = {"query", "key", "value", "dense"}
ARCHITECTURES = {
    "llama": (lambda: _llama_like(LlamaConfig, LlamaForCausalLM), LLAMA),
    "qwen2": (lambda: _llama_like(Qwen2Config, Qwen2ForCausalLM), LLAMA),
    "mistral": (lambda: _llama_like(MistralConfig, MistralForCausalLM), LLAMA),
    "gpt2": (tiny_gpt2, {"c_attn", "c_proj", "c_fc"}),
    "bert": (lambda: BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32)), BERT),
    "roberta": (lambda: RobertaModel(RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32)), BERT),
    "vit": (lambda: ViTModel(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)),
            {"query", "value", "q_proj", "v_proj"}),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_targets(arch):
    make, expected = ARCHITECTURES[arch]
    model = make()
    assert model.config.model_type == arch
    Adapter.from_recipe("lora", rank=2).apply(model)  # targets=None: the registered defaults
    adapted = {n.rsplit(".", 1)[-1] for n in adapted_layers(model)}
    assert adapted and adapted <= expected
    # every module carrying a default name was adapted, nothing else
    wanted = {n for n, m in make().named_modules() if n.rsplit(".", 1)[-1] in expected}
    assert set(adapted_layers(model)) == wanted


def test_absent_target_names_give_a_clear_error():
    model = tiny_gpt2()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match="match no module"):
        Adapter.from_recipe("lora", rank=2).apply(model, targets=["q_proj", "v_proj"])
    assert not adapted_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
