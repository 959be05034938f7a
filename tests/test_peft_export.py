"""PEFT-format export: every registered recipe, trained a few steps on tiny Llama,
GPT-2 and BERT models, exported and loaded by the real clients (peft's
``PeftModel.from_pretrained`` and transformers' ``load_adapter``); outputs must
match the lorakit model to 1e-5 in fp32."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorakit.core import Adapter, AdapterError, adapted_layers, merge, registry, unmerge
from lorakit.transformers import TruncationWarning, export_peft, peft_export, peft_state_dict

TOL = 1e-5
RECIPES = sorted(registry.load().recipes)


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def tiny_bert():
    return BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def run(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def trained(kind: str, recipe: str | Adapter, rank: int = 4, steps: int = 3, **overrides):
    """(pristine base, adapted model trained ``steps`` AdamW steps, input ids)."""
    torch.manual_seed(0)
    base = MODELS[kind]().eval()
    model = copy.deepcopy(base)
    adapter = recipe if isinstance(recipe, Adapter) else Adapter.from_recipe(recipe, rank=rank, **overrides)
    adapter.apply(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a fixed random target: a loss no LayerNorm makes constant
        target = torch.randn(run(base, ids).shape, generator=torch.Generator().manual_seed(2))
    model.train()
    for _ in range(steps):
        (run(model, ids) - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return base, model.eval(), ids


def check_roundtrip(tmp_path, kind, recipe, require_change=True):
    base, model, ids = trained(kind, recipe)
    with torch.no_grad():
        ref = run(model, ids)
        if require_change:
            assert (ref - run(base, ids)).abs().max() > 1e-4, "training did not move the adapter; vacuous test"
    # a magnitude head without DoRA's meaning (the IA3 plugin's gain) exports folded, as its docs say
    heads = {layer.magnitude is not None and not any(i.exported_as for i in layer.slots.slot_info.values())
             for layer in adapted_layers(model).values()}
    path = export_peft(model, tmp_path / "peft", fold_magnitude=True in heads)

    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    for key, r in config["rank_pattern"].items():
        assert config["alpha_pattern"][key] == r  # scaling alpha/r = 1 for every module
    assert sorted(config["target_modules"]) == sorted(adapted_layers(model))

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    hf_model = copy.deepcopy(base)
    hf_model.load_adapter(str(path))
    hf_model.eval()
    for client in (peft_model, hf_model):
        assert_matches(client, model, ref, ids)


def assert_matches(client, model, ref, ids):
    """The client's output equals the lorakit model's (fp32) to TOL, or — where the
    lorakit fp32 forward itself carries rounding above TOL (a trained state with a
    nearly cancelling row, e.g. diagonal+ldu+dora) — its exact value, computed in fp64."""
    with torch.no_grad():
        out = run(client, ids)
        err = (out - ref).abs().max()
        if err > TOL:
            exact = run(copy.deepcopy(model).double().eval(), ids)  # eval() drops the fp32 factor cache
            err = min(err, (out.double() - exact).abs().max())
    assert err <= TOL


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_export_loads_in_peft_and_transformers(tmp_path, kind, recipe):
    check_roundtrip(tmp_path, kind, recipe)


def _combos():
    from lorakit.conformance import combinations

    return {str(c): c for c in combinations()}


# compositions that are no named recipe: generated factors + DeLoRA + LU residual,
# frozen factors + DoRA, generated magnitude over PiSSA
COMPOSITIONS = [dict(generator="mlp", normalizer="delora", init="ldu"),
                dict(generator="diagonal", normalizer="scale", init="pissa", magnitude="dora"),
                dict(generator="mlp", normalizer="delora", init="kaiming", magnitude="dora")]


@pytest.mark.parametrize("composition", COMPOSITIONS, ids=lambda c: "+".join(c.values()))
def test_export_compositions(tmp_path, composition):
    kinds = registry.load().primitives
    missing = [n for k, n in zip(("generator", "normalizer", "initializer", "magnitude"), composition.values())
               if n not in kinds[k]]
    if missing:
        pytest.skip(f"primitives {missing} not registered")
    check_roundtrip(tmp_path, "llama", Adapter(rank=4, **composition))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_every_combination(tmp_path, kind):
    failures = []
    for name, combo in _combos().items():
        try:
            # some compositions cannot move (diagonal over a zero B0): still compare
            check_roundtrip(tmp_path / name, kind, combo.adapter(4), require_change=False)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def test_dora_key_names_and_config(tmp_path):
    if "dora" not in RECIPES:
        pytest.skip("no 'dora' recipe registered")
    _, model, _ = trained("llama", "dora")
    tensors, config = peft_state_dict(model)
    assert config["use_dora"] is True
    name = "model.layers.0.self_attn.q_proj"
    layer = adapted_layers(model)[name]
    m = tensors[f"base_model.model.{name}.lora_magnitude_vector.weight"]
    assert torch.equal(m, layer.slots()["m"].detach())
    A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
    assert A.shape[1] == 16 and B.shape[0] == 16 and A.shape[0] == B.shape[1]


def test_factors_reproduce_the_merged_update(tmp_path):
    """lora_B @ lora_A equals W_eff − W̄ computed by lorakit's merge, for a residualized recipe."""
    recipe = "pissa" if "pissa" in RECIPES else "lora"
    base, model, _ = trained("gpt2", recipe)
    tensors, _ = peft_state_dict(model, prefix="")
    W0 = {n: layer.kind.matrix(layer.base).detach().clone() for n, layer in adapted_layers(model).items()}
    merge(model)
    for name, layer in adapted_layers(model).items():
        delta = layer.kind.matrix(layer.base) - W0[name]
        BA = tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]
        assert (BA - delta).abs().max() <= 1e-5, name
    unmerge(model)


def test_rank_pattern_when_ranks_differ(tmp_path):
    base, model, ids = trained("llama", "lora", rank=4, rank_pattern={"v_proj": 2})
    export = peft_export(model, task_type="CAUSAL_LM")
    assert export.config["r"] == 4
    v_keys = {k for k in export.config["rank_pattern"] if k.endswith("v_proj")}
    assert len(v_keys) == 2 and all(export.config["rank_pattern"][k] == 2 for k in v_keys)
    path = export.save(tmp_path / "p")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        assert (run(peft_model, ids) - run(model, ids)).abs().max() <= TOL


def test_truncated_export_reports_relative_error(tmp_path):
    recipe = "delora" if "delora" in RECIPES else "lora"  # rank-2r residualized update
    _, model, _ = trained("llama", recipe)
    exact = peft_export(model, prefix="")
    with pytest.warns(TruncationWarning, match="relative error"):
        path = export_peft(model, tmp_path / "t", rank=1)
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        stored = json.loads(f.metadata()["lorakit_rel_errors"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name in adapted_layers(model):
        full = exact.tensors[f"{name}.lora_B.weight"] @ exact.tensors[f"{name}.lora_A.weight"]
        S = torch.linalg.svdvals(full.double())
        expected = float((S[1:].square().sum() / S.square().sum()).sqrt())
        assert stored[name] == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)
        assert max(peft_export(model).rel_errors.values()) == 0.0  # exact export: silent


def test_export_bad_input(tmp_path):
    model = tiny_llama()
    with pytest.raises(AdapterError, match="no lorakit adapter"):
        export_peft(model, tmp_path / "x")
    Adapter.from_recipe("lora", rank=2).apply(model, targets=["q_proj"])
    with pytest.raises(AdapterError, match="rank"):
        export_peft(model, tmp_path / "x", rank=0)
    assert not (tmp_path / "x").exists()


def test_registered_as_exporter(tmp_path):
    _, model, _ = trained("llama", "lora", steps=1)
    path = registry.load().exporters["peft"](model, tmp_path / "e")
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
