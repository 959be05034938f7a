"""PEFT's DeLoRA (``peft.tuners.delora``): ``export_peft(format="delora")`` and ``import_peft``
of DeLoRA folders, checked against the real client (``PeftModel.from_pretrained``, fp32
logits within 1e-5) on tiny Llama and BERT models after a few training steps, and against
fp64 (the rewrite of the residual form is exact to 1e-12)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorakit.core import Adapter, AdapterError, adapted_layers
from lorakit.normalizers import DeLoRA
from lorakit.transformers import PeftImportError, export_peft, import_peft
from lorakit.transformers.delora_peft import equal_terms, equalizing_rotation

TOL = 1e-5
F64 = torch.float64
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT = ["query", "key", "value", "dense"]


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def tiny_bert():
    return BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))


MODELS = {"llama": (tiny_llama, LLAMA), "bert": (tiny_bert, BERT)}
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def run(model, ids=IDS):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def train(model, steps=3, lr=2e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    target = torch.randn(run(model).shape, generator=torch.Generator().manual_seed(2))
    model.train()
    for _ in range(steps):
        (run(model) - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def trained(kind, adapter):
    torch.manual_seed(0)
    make, targets = MODELS[kind]
    base = make().eval()
    model = train(adapter.apply(copy.deepcopy(base), targets=targets))
    with torch.no_grad():
        assert (run(model) - run(base)).abs().max() > 1e-3, "training did not move the adapter; vacuous test"
    return base, model


PEFTS_OWN = Adapter(normalizer=DeLoRA(), init="kaiming", rank=4)  # B0 = 0: PEFT's DeLoRA as it is
REWRITTEN = {  # compositions PEFT's parameters cannot hold as they are: written exactly, rewritten
    "residual": Adapter.from_recipe("delora", rank=4),
    "official-live": Adapter.from_recipe("delora", rank=4, normalizer=DeLoRA(lambda0=1, residual_lambda="live")),
    "eps-frobenius": Adapter(normalizer=DeLoRA(eps=1e-2, weight_norm="frobenius"), init="kaiming", rank=4),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_pefts_own_form_round_trips_as_is(tmp_path, kind):
    base, model = trained(kind, copy.deepcopy(PEFTS_OWN))
    path = export_peft(model, tmp_path / "d", format="delora")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "DELORA" and config["r"] == 4 and config["rank_pattern"] == {}
    tensors = load_file(path / "adapter_model.safetensors")
    for name, layer in adapted_layers(model).items():  # the parameters themselves, bit for bit
        key = f"base_model.model.{name}."
        assert torch.equal(tensors[key + "delora_A"], layer.slots.A)
        assert torch.equal(tensors[key + "delora_B"], layer.slots.B)
        assert torch.equal(tensors[key + "delora_lambda"], layer.slots.lambda_.reshape(1))
        assert torch.equal(tensors[key + "delora_w_norm"], layer.slots.w_norm)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), path, is_trainable=True).eval()
    back = import_peft(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        ref = run(model)
        assert (run(theirs) - ref).abs().max() <= TOL
        assert torch.equal(run(back), ref)
    # the same parameterization: a further training step in PEFT and in lorakit agrees
    for m in (theirs, back):
        torch.manual_seed(3)  # BERT's dropout draws the same masks in both
        train(m, steps=2)
    with torch.no_grad():
        assert (run(theirs) - run(back)).abs().max() <= TOL


@pytest.mark.parametrize(("kind", "form"), [("llama", f) for f in sorted(REWRITTEN)] + [("bert", "residual")])
def test_rewritten_forms_are_exact_in_peft(tmp_path, kind, form):
    base, model = trained(kind, copy.deepcopy(REWRITTEN[form]))
    path = export_peft(model, tmp_path / "d", format="delora")
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    for name, layer in adapted_layers(model).items():
        A, B = (tensors[f"base_model.model.{name}.delora_{p}"] for p in "AB")
        if not B.any():  # a zero update (BERT's pooler gets no gradient here): PEFT's init, B = 0
            with torch.no_grad():
                assert torch.equal(layer.effective_weight(), layer.base.weight) and A.shape[0] == 1
            continue
        assert A.shape[0] <= min(8, *B.shape[:1], A.shape[1])  # the update's rank: ≤ 2r and ≤ min(out, in)
        # unit norms: PEFT's clamp at 1e-4 never acts, whatever its constant
        torch.testing.assert_close(A.norm(dim=1), torch.ones(A.shape[0]), rtol=0, atol=1e-6)
        torch.testing.assert_close(B.norm(dim=0), torch.ones(A.shape[0]), rtol=0, atol=1e-6)
    assert config["target_modules"] == sorted(adapted_layers(model))
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    back = import_peft(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        ref = run(model)
        assert (run(theirs) - ref).abs().max() <= TOL
        assert (run(back) - ref).abs().max() <= TOL


def test_rewrite_is_exact_in_fp64():
    """The recipe ``delora``'s ``λN − λ0N0`` after training, in fp64: PEFT's own delta
    (``DeloraLayer._compute_delta``) of the written tensors equals ``W_eff − W̄`` to 1e-12."""
    torch.manual_seed(0)
    base = tiny_llama().double().eval()
    model = train(Adapter.from_recipe("delora", rank=4).apply(copy.deepcopy(base), targets=LLAMA))
    from lorakit.transformers.delora_peft import delora_export
    tensors = delora_export(model, dtype=F64).tensors
    for name, layer in adapted_layers(model).items():
        A, B, lam, w = (tensors[f"base_model.model.{name}.delora_{p}"] for p in ("A", "B", "lambda", "w_norm"))
        delta = peft.tuners.delora.layer.DeloraLayer._compute_delta(A, B, lam, A.shape[0], w)
        with torch.no_grad():
            expected = layer.effective_weight() - layer.base.weight
        assert expected.abs().max() > 1e-4
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-12 * expected.abs().max().item())


def test_equal_terms_property():
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 5, 9):  # singular values over 8 decades: the rotation equalizes them all
        S = torch.rand(k, generator=g, dtype=F64) * torch.logspace(0, -8, k, dtype=F64)
        Q = equalizing_rotation(S)
        torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=F64), rtol=0, atol=1e-14)
        torch.testing.assert_close(((Q.T * S) @ Q).diag(), S.mean().expand(k), rtol=1e-13, atol=0)
    B, A = torch.randn(12, 6, generator=g, dtype=F64), torch.randn(6, 10, generator=g, dtype=F64)
    w = torch.rand(10, generator=g, dtype=F64) + 0.1
    w[3], A[:, 3] = 0.0, 0.0  # a zero column of W̄: the update's column is 0 there
    B_p, A_p, lam = equal_terms(B, A * w, w)
    delta = peft.tuners.delora.layer.DeloraLayer._compute_delta(A_p, B_p, lam, A_p.shape[0], w)
    torch.testing.assert_close(delta, B @ (A * w), rtol=0, atol=1e-13)
    assert equal_terms(B * 0, A * w, w) is None


def test_peft_made_adapter_imports(tmp_path):
    """A DeLoRA trained by PEFT (rank and λ patterns, r = 12 > 8 = min(out, in) for k/v_proj)
    imports with equal logits, continued (r > min: the same update at its own rank) or merged."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    config = peft.DeloraConfig(r=4, delora_lambda=3, target_modules=LLAMA, rank_pattern={"k_proj": 12},
                               lambda_pattern={"v_proj": 7})
    theirs = train(peft.get_peft_model(copy.deepcopy(base), config))
    theirs.save_pretrained(tmp_path / "d")
    with torch.no_grad():
        ref = run(theirs)
    for recipe in (None, "lora"):
        mine = import_peft(copy.deepcopy(base), tmp_path / "d", recipe).eval()
        with torch.no_grad():
            assert (run(mine) - ref).abs().max() <= TOL
    layers = adapted_layers(import_peft(copy.deepcopy(base), tmp_path / "d"))
    assert layers["model.layers.0.self_attn.q_proj"].rank == 4 and layers["model.layers.0.self_attn.k_proj"].rank <= 8


def test_import_on_another_base_warns_and_computes_as_peft(tmp_path):
    torch.manual_seed(0)
    base, model = trained("llama", copy.deepcopy(PEFTS_OWN))
    export_peft(model, tmp_path / "d", format="delora")
    other = tiny_llama().eval()  # another seed: other column norms
    with pytest.warns(UserWarning, match="delora_w_norm differs"):
        mine = import_peft(copy.deepcopy(other), tmp_path / "d").eval()
    theirs = PeftModel.from_pretrained(copy.deepcopy(other), tmp_path / "d").eval()
    with torch.no_grad():
        assert (run(mine) - run(theirs)).abs().max() <= TOL


REFUSED = {  # composition -> what the one error names
    "lora": (lambda: Adapter.from_recipe("lora", rank=4), "tiny_llama", "'scale' normalizer"),
    "dora-head": (lambda: Adapter(normalizer=DeLoRA(), init="kaiming", magnitude="dora", rank=4), "tiny_llama",
                  "magnitude head 'dora'"),
    "bias": (lambda: Adapter(normalizer=DeLoRA(), init="kaiming", rank=4, bias="all"), "tiny_bert",
             "trained biases"),
    "conv1d": (lambda: Adapter(normalizer=DeLoRA(), init="kaiming", rank=4), "gpt2", "Conv1D"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_what_peft_cannot_hold(tmp_path, case):
    make_adapter, make_model, match = REFUSED[case]
    if make_model == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
        targets = ["c_attn"]
    else:
        model = globals()[make_model]()
        targets = LLAMA if make_model == "tiny_llama" else BERT
    make_adapter().apply(model, targets=targets)
    with pytest.raises(AdapterError, match=match):
        export_peft(model, tmp_path / "d", format="delora")
    assert not (tmp_path / "d").exists()


def test_bad_options_and_files(tmp_path):
    base, model = trained("llama", copy.deepcopy(PEFTS_OWN))
    with pytest.raises(AdapterError, match="format='vera'"):
        export_peft(model, tmp_path / "x", format="vera")
    with pytest.raises(AdapterError, match="max_rank= and fold_magnitude= apply to format='lora'"):
        export_peft(model, tmp_path / "x", format="delora", max_rank=2)
    assert not (tmp_path / "x").exists()
    path = export_peft(model, tmp_path / "d", format="delora")
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.delora_w_norm"
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(PeftImportError, match="'model.layers.0.self_attn.q_proj' has .* expected"):
        import_peft(copy.deepcopy(base), path)
    save_file({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.delora_C": tensors[key].clone()}, weights)
    with pytest.raises(PeftImportError, match="keys lorakit does not understand"):
        import_peft(copy.deepcopy(base), path)
    save_file(tensors, weights)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    fresh = copy.deepcopy(base)
    with pytest.raises(PeftImportError, match="DeloraConfig options have no lorakit equivalent"):
        import_peft(fresh, path)
    assert not adapted_layers(fresh)
