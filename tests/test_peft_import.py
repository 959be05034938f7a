"""Import of PEFT LoRA/DoRA adapters made by PEFT itself: the lorakit model starts at
the PEFT model's function, keeps training exactly as PEFT would, re-exports, and
bad files give clear errors listing what is wrong."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorakit.core import Adapter, AdapterError, adapted_layers, adapter_config, registry
from lorakit.transformers import PeftImportError, export_peft, import_peft

TOL = 1e-5


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model):
    return model(input_ids=IDS).logits


def peft_adapter(tmp_path, make=tiny_llama, **config):
    """A PEFT adapter with non-trivial values (random B, scaled magnitude), saved by PEFT."""
    base = make().eval()
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "init_lora_weights": False, **config}
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**config)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.rand_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    return base, peft_model, tmp_path / "peft"


CONFIGS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "patterns": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
}


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_import_continues_the_same_adapter(tmp_path, variant):
    base, peft_model, path = peft_adapter(tmp_path, **CONFIGS[variant])
    model = import_peft(copy.deepcopy(base), path)
    assert len(adapted_layers(model)) == 6
    with torch.no_grad():
        assert (logits(model.eval()) - logits(peft_model)).abs().max() <= TOL

    # one SGD step on both: lorakit's parameterization is PEFT's, so the step is the same
    # (for alpha_pattern modules B is rescaled, so only the other variants compare steps).
    if variant != "patterns":
        for m in (model, peft_model):
            m.train()
            for n, p in m.named_parameters():
                p.requires_grad_("lora_" in n or ".slots." in n)
            opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
            logits(m).square().mean().backward()
            opt.step()
            m.eval()
        with torch.no_grad():
            assert (logits(model) - logits(peft_model)).abs().max() <= TOL
            assert (logits(model) - logits(base)).abs().max() > 1e-3

    # and the re-export loads in PEFT with the same function
    out = export_peft(model, tmp_path / "again")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        assert (logits(reloaded) - logits(model)).abs().max() <= TOL


def test_import_gpt2_conv1d(tmp_path):
    base, peft_model, path = peft_adapter(tmp_path, make=tiny_gpt2, target_modules=["c_attn", "c_fc"],
                                          fan_in_fan_out=True)
    model = import_peft(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        assert (logits(model) - logits(peft_model)).abs().max() <= TOL


@pytest.mark.parametrize("dora", [False, True])
def test_import_with_another_recipe_starts_at_the_peft_model(tmp_path, dora):
    recipe = "delora" if "delora" in registry.load().recipes else "lora"
    base, peft_model, path = peft_adapter(tmp_path, use_dora=dora)
    model = import_peft(copy.deepcopy(base), path, recipe=Adapter.from_recipe(recipe, rank=2)).eval()
    assert adapter_config(model)["recipe"] == recipe and len(adapted_layers(model)) == 6
    with torch.no_grad():
        assert (logits(model) - logits(peft_model)).abs().max() <= TOL
    with pytest.warns(UserWarning, match="merged"):
        export_peft(model, tmp_path / "x")


def test_unknown_keys_are_listed_and_model_unchanged(tmp_path):
    base, _, path = peft_adapter(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(64, 16)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(16)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftImportError, match=r"2 keys lorakit does not understand: .*lm_head\.modules_to_save"
                                              r"\.weight.*q_proj\.lora_B\.bias"):
        import_peft(model, path)
    assert not adapted_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_peft_folders(tmp_path):
    base, _, path = peft_adapter(tmp_path)
    with pytest.raises(PeftImportError, match="not found"):
        import_peft(copy.deepcopy(base), tmp_path / "nowhere")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(PeftImportError, match="peft_type 'IA3'"):
        import_peft(copy.deepcopy(base), path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(PeftImportError, match="bias"):
        import_peft(copy.deepcopy(base), path)
    # an untrusted config is read strictly: NaN, a duplicated key, a folder in its place
    text = json.dumps(config)
    (path / "adapter_config.json").write_text(text[:-1] + ", \"lorakit_probe\": NaN}")
    with pytest.raises(PeftImportError, match="NaN"):
        import_peft(copy.deepcopy(base), path)
    (path / "adapter_config.json").write_text(text[:-1] + ', "r": 64}')
    with pytest.raises(PeftImportError, match="given twice"):
        import_peft(copy.deepcopy(base), path)
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftImportError, match="another architecture"):
        import_peft(tiny_gpt2(), path)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(PeftImportError, match="made for another model"):
        import_peft(small, path)
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(PeftImportError, match="corrupt"):
        import_peft(copy.deepcopy(base), path)
    assert issubclass(PeftImportError, AdapterError)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "corda", "loftq", "lora_ga"])
def test_base_rewriting_inits_are_refused_with_the_fix(tmp_path, init):
    # PEFT rewrote W̄ for these; importing A, B onto the original W̄ would be silently wrong
    base, _, path = peft_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    model = copy.deepcopy(base)
    with pytest.raises(PeftImportError, match=r"rewrote the base.*path_initial_model_for_weight_conversion"):
        import_peft(model, path)
    assert not adapted_layers(model)


def test_real_pissa_adapter_refused_and_its_converted_form_imports_exactly(tmp_path):
    base = tiny_llama().eval()
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.peft_config["default"].init_lora_weights = True  # the initial copy, as PEFT's docs do
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "raw")
    with pytest.raises(PeftImportError, match="init_lora_weights='pissa'"):
        import_peft(copy.deepcopy(base), tmp_path / "raw")
    peft_model.save_pretrained(tmp_path / "converted",
                               path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    model = import_peft(copy.deepcopy(base), tmp_path / "converted").eval()
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)
