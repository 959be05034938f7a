"""Targeting: ``targets="all-linear"`` (PEFT's set), ``exclude=``,
``layers=``, and the registered default targets of each model family, checked on a
tiny config of every family the installed transformers has: the defaults apply,
export, and PEFT's loader reproduces the outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from test_peft_export import tiny_gpt2, tiny_llama
from transformers import CONFIG_MAPPING, AutoConfig, AutoModel, BertConfig, BertForSequenceClassification

from lorakit.core import Adapter, AdapterError, adapted_layers, load, save
from lorakit.transformers import DEFAULT_TARGETS, export_peft

_DEC = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, head_dim=8, pad_token_id=0)
_SEQ2SEQ = dict(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=0,
                decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)
_T5 = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
               patch_size=4)
_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=64, pad_token_id=0)
# a tiny config per family (model_type -> config arguments)
TINY = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3"], _DEC),
    "mixtral": {**_DEC, "num_local_experts": 2, "num_experts_per_tok": 1},
    "qwen2_moe": {**_DEC, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 16},
    "qwen3_moe": {**_DEC, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16},
    "olmoe": {**_DEC, "num_experts": 2, "num_experts_per_tok": 1, "eos_token_id": None},
    "gpt_oss": {**_DEC, "num_local_experts": 2, "num_experts_per_tok": 1},
    "gemma3": dict(text_config=_DEC, vision_config=_VISION, mm_tokens_per_image=4),
    "falcon": dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2),
    "gpt_neox": dict(_TEXT),
    "bloom": dict(vocab_size=64, hidden_size=16, n_layer=2, n_head=2),
    "gptj": dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=64),
    "opt": dict(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                word_embed_proj_dim=16, max_position_embeddings=64),
    "gpt2": dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0),
    "t5": _T5, "mt5": _T5,
    "bart": {**_SEQ2SEQ, "max_position_embeddings": 64},
    "whisper": {**_SEQ2SEQ, "num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 16},
    "clip": dict(text_config={**_TEXT, "max_position_embeddings": 16}, vision_config=_VISION, projection_dim=8),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "deberta-v2"], _TEXT),
    "modernbert": {**_TEXT, "local_attention": 4, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1,
                   "sep_token_id": 2},
    "vit": _VISION, "dinov2": _VISION,
}
FAMILIES = sorted(t for t in DEFAULT_TARGETS if t in CONFIG_MAPPING)


def tiny_model(model_type):
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **TINY[model_type])).eval()


def inputs(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 6), generator=g)
    pixels = torch.randn(2, 3, 8, 8, generator=g)
    kind = model.config.model_type
    if kind in ("vit", "dinov2"):
        return {"pixel_values": pixels}
    if kind == "clip":
        return {"input_ids": ids, "pixel_values": pixels}
    if kind == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=g), "decoder_input_ids": ids}
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids}


def first_output(model, kwargs):
    out = model(**kwargs)
    return next(v for v in out.values() if isinstance(v, torch.Tensor))


def moved(model):
    with torch.no_grad():
        for i, p in enumerate(q for q in model.parameters() if q.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype))
    return model


def test_every_family_has_a_tiny_config():
    assert set(DEFAULT_TARGETS) <= set(TINY), "add a tiny config for the new family"
    assert len(FAMILIES) >= 25


@pytest.mark.parametrize("family", FAMILIES)
def test_family_defaults_apply_export_and_load_in_peft(tmp_path, family):
    base = tiny_model(family)
    model = moved(Adapter.from_recipe("lora", rank=2).apply(copy.deepcopy(base)))
    assert adapted_layers(model), family
    kwargs = inputs(base)
    with torch.no_grad():
        ours = first_output(model, kwargs)
        assert not torch.allclose(ours, first_output(base, kwargs)), "the adapter changes nothing; vacuous"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), export_peft(model, tmp_path / family)).eval()
    with torch.no_grad():
        torch.testing.assert_close(first_output(peft_model, kwargs), ours, atol=1e-5, rtol=1e-4)


def _peft_all_linear(model, **config):
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules="all-linear", **config))
    prefix = "base_model.model."
    return {n.removeprefix(prefix) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("make", [
    tiny_llama, tiny_gpt2,
    lambda: BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32)),
], ids=["llama-lm_head", "gpt2-conv1d", "bert-classifier"])
def test_all_linear_is_peft_all_linear_without_the_head(make):
    model = make()
    ours = set(adapted_layers(Adapter(rank=2).apply(copy.deepcopy(model), targets="all-linear")))
    task = "SEQ_CLS" if isinstance(model, BertForSequenceClassification) else None
    assert ours == _peft_all_linear(model, task_type=task)
    assert not any(n.endswith(("lm_head", "classifier")) for n in ours)


def test_exclude_and_layers(tmp_path):
    names = lambda adapter: sorted(adapted_layers(adapter.apply(tiny_llama(), targets="all-linear")))
    everything = names(Adapter(rank=2))
    assert names(Adapter(rank=2, exclude=["down_proj", "o_proj"])) == [
        n for n in everything if not n.endswith(("down_proj", "o_proj"))]
    assert names(Adapter(rank=2, exclude=r".*\.mlp\..*")) == [n for n in everything if ".mlp." not in n]
    assert names(Adapter(rank=2, layers=[1])) == [n for n in everything if ".layers.1." in n]
    assert names(Adapter(rank=2, layers=range(0, 1))) == names(Adapter(rank=2, layers=0))
    with pytest.raises(AdapterError, match=r"exclude=\['dwn_proj'\] match no module"):
        Adapter(rank=2, exclude=["dwn_proj"]).apply(tiny_llama())
    with pytest.raises(AdapterError, match="layers"):
        Adapter(rank=2, layers=[-1])
    with pytest.raises(AdapterError, match="exclude"):
        Adapter(rank=2, exclude=[3])
    # config, native checkpoint and PEFT export keep the selection
    adapter = Adapter.from_recipe("op-lora", rank=2, exclude=["down_proj"], layers=range(1, 2))
    assert Adapter.from_config(json.loads(json.dumps(adapter.config()))).config() == adapter.config()
    model = moved(adapter.apply(tiny_llama(), targets="all-linear"))
    save(model, tmp_path / "ck")
    clone = tiny_llama()
    load(clone, tmp_path / "ck")
    assert sorted(adapted_layers(clone)) == sorted(adapted_layers(model))
    config = json.loads((export_peft(model.eval(), tmp_path / "peft") / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(adapted_layers(model))
