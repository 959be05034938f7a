"""Fused mixture-of-experts tensors as parameter targets (lorakit.core.experts, lorakit.transformers.moe):
every recipe on tiny Qwen3-MoE and Mixtral models, PEFT's loader on the export, bad input."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import (  # noqa: E402
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from lorakit.core import (  # noqa: E402
    Adapter,
    AdapterError,
    adapted_layers,
    load,
    merge,
    merge_and_unload,
    save,
    unload,
    unmerge,
)
from lorakit.core.experts import AdaptedParameters  # noqa: E402
from lorakit.core.plugins import registry  # noqa: E402
from lorakit.transformers import export_peft  # noqa: E402

TINY = dict(vocab_size=48, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, num_experts_per_tok=2)


def qwen3(experts=4, impl="grouped_mm"):
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY, intermediate_size=32, moe_intermediate_size=8,
                                               num_experts=experts)).eval()
    model.set_experts_implementation(impl)
    return model


def mixtral(experts=4, impl="eager"):
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**TINY, intermediate_size=8, num_local_experts=experts)).eval()
    model.set_experts_implementation(impl)
    return model


def olmoe(experts=4, impl="grouped_mm"):
    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(**TINY, intermediate_size=8, num_experts=experts, eos_token_id=None)).eval()
    model.set_experts_implementation(impl)
    return model


def gpt_oss(experts=4, impl="grouped_mm"):
    """gpt-oss: the transposed (E, in, out) layout with biases, gate and up interleaved."""
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(**TINY, intermediate_size=8, num_local_experts=experts,
                                           layer_types=["full_attention"] * 2)).eval()
    model.set_experts_implementation(impl)
    return model


FAMILIES = {"qwen3-grouped": qwen3, "qwen3-eager": lambda: qwen3(impl="eager"), "mixtral-eager": mixtral,
            "mixtral-grouped": lambda: mixtral(impl="grouped_mm"), "olmoe-grouped": olmoe, "gpt-oss-grouped": gpt_oss}
RECIPES = sorted(registry.load().recipes)
X = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(1))


def fused(model):
    return {n: p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}


def step(model, opt):
    model.train()
    loss = model(X, labels=X).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def logits(model):
    with torch.no_grad():
        return model(X).logits


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_on_experts(tmp_path, family, recipe):
    base = FAMILIES[family]()
    ref, W0 = logits(base), {n: p.detach().clone() for n, p in fused(base).items()}
    model = copy.deepcopy(base)
    Adapter.from_recipe(recipe, rank=2).apply(model, target_parameters=["gate_up_proj", "down_proj"])
    assert torch.equal(logits(model), ref)  # identity at init, exactly
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, AdaptedParameters) and len(experts.param_adapters["gate_up_proj"]) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".param_adapters." in n and ".slots." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, opt)
    after = logits(model)
    assert not torch.equal(after, ref)
    assert all(torch.equal(p, W0[n.replace(".base.", ".")]) for n, p in fused(model).items())  # base untouched
    # save -> load -> identical outputs and next step
    save(model, tmp_path / "ckpt", opt)
    again = copy.deepcopy(base)
    load(again, tmp_path / "ckpt")
    opt2 = torch.optim.AdamW([p for p in again.parameters() if p.requires_grad], lr=1e-2)
    load(again, tmp_path / "ckpt", opt2)  # the adapter it has: checked, then the optimizer state
    assert torch.equal(logits(again), after)
    step(model, opt)
    step(again, opt2)
    assert torch.equal(logits(again), logits(model))
    after = logits(model)
    # merge == unmerged; unmerge restores the base tensors (to rounding); merge_and_unload is the plain model
    merge(model)
    torch.testing.assert_close(logits(model), after, atol=1e-5, rtol=0)
    unmerge(model)
    for n, p in fused(model).items():
        torch.testing.assert_close(p, W0[n.replace(".base.", ".")], atol=1e-6, rtol=0)
    plain = merge_and_unload(copy.deepcopy(model))
    assert type(plain.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    assert not adapted_layers(plain)
    torch.testing.assert_close(logits(plain), after, atol=1e-5, rtol=0)
    # PEFT's target_parameters loader on the export (magnitudes folded: PEFT has no parameter DoRA)
    export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), after, atol=1e-5, rtol=0)
    # unload of a never-merged model: the pretrained model, its tensors bit-identical
    unload(again)
    assert all(torch.equal(p, W0[n]) for n, p in fused(again).items())
    assert torch.equal(logits(again), ref)


def test_modules_and_experts_together_export_to_peft(tmp_path):
    base = qwen3()
    model = copy.deepcopy(base)
    Adapter.from_recipe("dora", rank=2, modules_to_save=["gate"]).apply(model, targets="all-linear",
                                                                        target_parameters="experts")
    step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)
    import json

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                           for p in ("down_proj", "gate_up_proj")]
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"] and config["use_dora"] is False


def test_adapter_term_only_on_routed_tokens():
    """An expert no token is routed to computes no adapter term (its factors get no gradient)."""
    model = qwen3(experts=8)
    Adapter.from_recipe("lora", rank=2).apply(model, target_parameters="experts")
    model.train()
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.slots.B.normal_()
    x = X[:1, :1]  # one token: top-2 of 8 experts
    model(x).logits.sum().backward()
    experts = model.model.layers[0].mlp.experts.param_adapters["gate_up_proj"]
    got = [e for e, layer in enumerate(experts) if layer.slots.B.grad is not None]
    assert len(got) == 2


@pytest.mark.parametrize("bad, message", [
    (["gate_up_projj"], "target_parameters ['gate_up_projj'] match no parameter"),
    (["q_proj.weight"], "lorakit adapts fused 3-D expert tensors"),
    ("gate_up_proj", "give parameter names"),
])
def test_bad_parameter_targets(bad, message):
    model = qwen3()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        Adapter(rank=2).apply(model, target_parameters=bad)
    assert not adapted_layers(model) and model.state_dict().keys() == before.keys()


def test_unknown_layout_is_refused():
    model = qwen3()
    experts = model.model.layers[0].mlp.experts
    experts.extra = torch.nn.Parameter(torch.zeros(4, 3, 3))
    with pytest.raises(AdapterError, match=r"parameter 'model\.layers\.0\.mlp\.experts\.extra' \(4, 3, 3\): .* "
                                           "layout lorakit does not know"):
        Adapter(rank=2).apply(model, target_parameters=["extra"])
    assert not adapted_layers(model)


def test_module_target_on_experts_says_use_target_parameters():
    with pytest.raises(AdapterError, match="target_parameters"):
        Adapter(rank=2).apply(qwen3(), targets=["experts"])


def test_checkpoint_with_another_expert_count_is_refused(tmp_path):
    model = qwen3(experts=4)
    Adapter(rank=2).apply(model, target_parameters="experts")
    save(model, tmp_path / "ckpt")
    other = qwen3(experts=8)
    with pytest.raises(AdapterError, match=r"parameter 'model\.layers\.0\.mlp\.experts\.gate_up_proj': the "
                                           "checkpoint has 4 experts, the model 8"):
        load(other, tmp_path / "ckpt")
    assert not adapted_layers(other)


# -- import_peft of PEFT's target_parameters folders (lorakit.transformers.peft_experts) ------------------------

def _peft_trained(base, path, **extra):
    """A PEFT target_parameters LoRA with non-zero factors (init_lora_weights=False), saved to ``path``."""
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False,
                             target_parameters=["gate_up_proj", "down_proj"], **extra)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(path)
    return path


def _adamw_step(model):
    step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0))


@pytest.mark.parametrize("family", ["qwen3-grouped", "mixtral-eager"])
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"alpha_pattern": {"down_proj": 3}}])
def test_import_peft_trained_target_parameters(tmp_path, family, extra):
    """A PEFT-trained target_parameters adapter imports with PEFT's logits, and (recipe=None: the same
    parameterization) a training step on it is PEFT's step on the same folder (not with an alpha_pattern,
    folded into B: the value is exact, that parameter's learning-rate scale is lorakit's alpha/r)."""
    from lorakit.transformers import import_peft

    base = FAMILIES[family]()
    path = _peft_trained(base, tmp_path / "peft", **extra)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), path, is_trainable=True)
    ours = import_peft(copy.deepcopy(base), path)
    assert len(adapted_layers(ours)) == 2 + 2 * 2 * 4  # q_proj per layer, 4 experts per fused tensor
    assert (logits(theirs) - logits(base)).abs().max() > 1e-2  # a real update
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    if "alpha_pattern" not in extra:
        _adamw_step(theirs)
        _adamw_step(ours)
        torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    merged = import_peft(copy.deepcopy(base), path, "pissa")  # another recipe on the merged experts
    torch.testing.assert_close(logits(merged), logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), path)),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_export_import_round_trip(tmp_path, recipe):
    """lorakit -> PEFT folder -> import_peft: lorakit's logits; exported again, the same tensors; two imports
    of one folder take identical next steps."""
    from safetensors.torch import load_file

    from lorakit.transformers import import_peft

    base = qwen3()
    model = copy.deepcopy(base)
    Adapter.from_recipe(recipe, rank=2).apply(model, target_parameters="experts")
    step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    export_peft(model, tmp_path / "a")
    first, second = (import_peft(copy.deepcopy(base), tmp_path / "a") for _ in range(2))
    torch.testing.assert_close(logits(first), logits(model), atol=1e-5, rtol=0)
    export_peft(first, tmp_path / "b")
    a, b = (load_file(tmp_path / f / "adapter_model.safetensors") for f in "ab")
    assert a.keys() == b.keys()

    def updates(tensors):  # per expert B_e A_e (PEFT's layout: A rows e·k + j, B columns j·E + e)
        for key in (k for k in tensors if k.endswith("lora_A.weight")):
            A, B = tensors[key], tensors[key.replace("lora_A", "lora_B")]
            yield torch.einsum("okE,Eki->Eoi", B.reshape(B.shape[0], -1, 4), A.reshape(4, -1, A.shape[1]))
    for got, want in zip(updates(b), updates(a)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    _adamw_step(first)
    _adamw_step(second)
    assert torch.equal(logits(first), logits(second))


def test_import_peft_expert_count_mismatch_is_refused(tmp_path):
    from lorakit.transformers import PeftImportError, import_peft

    path = _peft_trained(qwen3(experts=4), tmp_path / "peft")
    other = qwen3(experts=8)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PeftImportError, match=r"parameter 'model\.layers\.0\.mlp\.experts\.gate_up_proj' has 8 "
                                              r"experts but the file's lora_A \(8, 16\)"):
        import_peft(other, path)
    assert not adapted_layers(other) and all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_import_peft_parameter_the_model_lacks_is_refused(tmp_path):
    import json

    from lorakit.transformers import PeftImportError, import_peft

    base = qwen3()
    path = _peft_trained(base, tmp_path / "peft")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": ["w13_weight"]}))
    with pytest.raises(PeftImportError, match=r"target_parameters \['w13_weight'\] match no parameter"):
        import_peft(base, path)
    assert not adapted_layers(base)


@pytest.mark.parametrize("recipe", ["lora", "dora", "pissa"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_batched_expert_terms_equal_per_segment(monkeypatch, recipe, dropout):
    """The grouped forward's stacked adapter terms (two grouped GEMMs per fused tensor) compute the
    per-expert segment formulas to rounding: outputs and every slot's gradient, with dropout too."""
    from lorakit.transformers import moe

    def run():
        model = qwen3(experts=8)
        Adapter.from_recipe(recipe, rank=3, dropout=dropout).apply(model, target_parameters="experts")
        with torch.no_grad():
            for layer in adapted_layers(model).values():
                for p in layer.slots.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        model.train()
        torch.manual_seed(3)
        out = model(X, labels=X)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    batched, grads = run()
    monkeypatch.setattr(moe, "_batched_terms", lambda *args: None)
    segments, grads_ref = run()
    torch.testing.assert_close(batched, segments, atol=1e-6, rtol=0)
    assert grads.keys() == grads_ref.keys()
    for n, g in grads.items():
        assert (g is None) == (grads_ref[n] is None), n
        if g is not None:
            torch.testing.assert_close(g, grads_ref[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3-grouped", "mixtral-eager", "olmoe-grouped", "gpt-oss-grouped"])
def test_default_targets_per_family(family):
    """The family's registered defaults (no targets) reach attention (q, k, v, o) only: the experts are
    never a module default. With target_parameters and no targets only the fused tensors are adapted (PEFT's
    target_modules=None); "all-linear" + "experts" takes attention and every expert (the router is not an
    nn.Linear in transformers 5: train it whole with modules_to_save)."""
    def adapted(**where):
        model = FAMILIES[family]()
        Adapter(rank=2).apply(model, **where)
        counts = {}
        for name in adapted_layers(model):
            short = name.split(".param_adapters.")[1].split(".")[0] if ".param_adapters." in name \
                else name.rpartition(".")[2]
            counts[short] = counts.get(short, 0) + 1
        return counts

    attention = {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2}
    experts = {"gate_up_proj": 2 * 4, "down_proj": 2 * 4}
    assert adapted() == attention
    assert adapted(target_parameters="experts") == experts
    assert adapted(targets="all-linear", target_parameters="experts") == {**attention, **experts}


def test_import_peft_use_dora_with_target_parameters_is_refused(tmp_path):
    """PEFT refuses use_dora with target_parameters; a folder claiming both is not PEFT's (nothing changes)."""
    import json

    from lorakit.transformers import PeftImportError, import_peft

    base = qwen3()
    path = _peft_trained(base, tmp_path / "peft")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(PeftImportError, match="use_dora with target_parameters"):
        import_peft(base, path)
    assert not adapted_layers(base)


# -- a 2-D parameter of a module no layer kind adapts (the router's weight), as one matrix ----------------------

ROUTER = {"qwen3-grouped": "mlp.gate.weight", "gpt-oss-grouped": "mlp.router.weight"}


@pytest.mark.parametrize("family, recipe", [*(("qwen3-grouped", r) for r in RECIPES),
                                            ("gpt-oss-grouped", "lora"), ("gpt-oss-grouped", "dora")])
def test_two_dimensional_parameter_target(tmp_path, family, recipe):
    """The router's 2-D weight (a module lorakit has no layer kind for) as one matrix beside the experts'
    down_proj: identity exact, it trains, save/load/next step identical, merge, PEFT's loader on the export
    (PEFT's 2-D ParamWrapper: the E = 1 case of the fused layout), import_peft back, unload bit-identical."""
    from lorakit.transformers import import_peft

    base = FAMILIES[family]()
    ref = logits(base)
    model = copy.deepcopy(base)
    Adapter.from_recipe(recipe, rank=2).apply(model, target_parameters=[ROUTER[family], "down_proj"])
    assert torch.equal(logits(model), ref)
    router = adapted_layers(model)["model.layers.0." + ROUTER[family].replace(".weight", ".param_adapters.weight.0")]
    before = {n: p.detach().clone() for n, p in router.slots.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, opt)
    assert any(not torch.equal(p, before[n]) for n, p in router.slots.named_parameters() if n in before)
    save(model, tmp_path / "ckpt", opt)
    again = copy.deepcopy(base)
    load(again, tmp_path / "ckpt")
    opt2 = torch.optim.AdamW([p for p in again.parameters() if p.requires_grad], lr=1e-2)
    load(again, tmp_path / "ckpt", opt2)
    step(model, opt)
    step(again, opt2)
    after = logits(model)
    assert torch.equal(logits(again), after)
    export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), after, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(import_peft(copy.deepcopy(base), tmp_path / "peft")), after, atol=1e-5, rtol=0)
    merge(model)
    torch.testing.assert_close(logits(model), after, atol=1e-5, rtol=0)
    unload(again)
    assert torch.equal(logits(again), ref)


@pytest.mark.parametrize("where, message", [
    ({"target_parameters": ["mlp.gate.weight"], "dropout": 0.1}, r"parameter 'model\.layers\.0\.mlp\.gate\.weight': "
                                                                 r"dropout=0\.1 acts on a layer's input"),
    ({"target_parameters": ["q_norm.weight"]}, r"parameter 'model\.layers\.0\.self_attn\.q_norm\.weight' \(8,\) of a "
                                               r"Qwen3MoeRMSNorm: lorakit adapts fused 3-D expert tensors"),
])
def test_two_dimensional_parameter_refusals(where, message):
    model = qwen3()
    dropout = where.pop("dropout", 0.0)
    with pytest.raises(AdapterError, match=message):
        Adapter(rank=2, dropout=dropout).apply(model, **where)
    assert not adapted_layers(model)
    assert not any(isinstance(m, AdaptedParameters) for m in model.modules())
