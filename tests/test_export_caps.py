"""Export rank caps and DoRA folding: ``max_rank=k``,
``max_rank="auto"`` and ``fold_magnitude`` for every recipe, loaded by PEFT's and
transformers' own readers on a tiny Llama, plus the diffusers exporter."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from test_peft_export import RECIPES, TOL, assert_matches, run, trained

from lorakit.core import AdapterError, adapted_layers, registry
from lorakit.core.functional import energy_rank, reduce_dense
from lorakit.core.model_ops import folded_update
from lorakit.transformers import TruncationWarning, export_peft, peft_export

DORA_RECIPES = [r for r in RECIPES if registry.load().recipes[r].magnitude is not None]


def stored(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lorakit_rel_errors"])


def peft_delta(tensors, name):
    p = f"base_model.model.{name}."
    return tensors[p + "lora_B.weight"].double() @ tensors[p + "lora_A.weight"].double()


@torch.no_grad()
def exact_updates(model):
    """Each module's exact ``W_eff − W̄`` (fp64), for checking what a truncation kept."""
    out = {}
    for name, layer in adapted_layers(model).items():
        if layer.magnitude is not None:
            out[name] = folded_update(layer)
        else:
            B, A, _ = layer.factors()
            out[name] = B.double() @ A.double()
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_max_rank_caps_every_module(tmp_path, recipe):
    """Every module has rank ≤ k, PEFT and transformers load the file and compute
    ``W̄ + B_k A_k`` (the stored factors), and the reported error is that of the
    best rank-k approximation of the update (Eckart–Young: the exact SVD tail)."""
    base, model, ids = trained("llama", recipe)
    k = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        path = export_peft(model, tmp_path / "p", max_rank=k, fold_magnitude=recipe in DORA_RECIPES)
    tensors, errors = stored(path)
    config = json.loads((path / "adapter_config.json").read_text())
    assert not config["use_dora"] and not any("magnitude" in key for key in tensors)
    exact = exact_updates(model)
    for name, D in exact.items():
        A = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert A.shape[0] <= k
        S = torch.linalg.svdvals(D)
        best = float((S[k:].square().sum() / S.square().sum()).sqrt())
        actual = float((D - peft_delta(tensors, name)).norm() / D.norm())
        assert errors[name] == pytest.approx(actual, rel=1e-4, abs=1e-7)  # the report is the truth
        assert actual <= best * 1.01 + 1e-7  # and the truncation is (near-)optimal
    # the clients apply exactly the stored factors
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name in exact:
            reference.get_submodule(name).weight += peft_delta(tensors, name).float()
        ref = run(reference, ids)
    client = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    hf = copy.deepcopy(base)
    hf.load_adapter(str(path))
    for c in (client, hf.eval()):
        with torch.no_grad():
            assert (run(c, ids) - ref).abs().max() <= TOL


def test_max_rank_above_the_update_rank_is_exact(tmp_path):
    base, model, ids = trained("llama", "delora")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)  # nothing lost: silent
        path = export_peft(model, tmp_path / "p", max_rank=64)
    _, errors = stored(path)
    assert max(errors.values()) < 1e-6
    with torch.no_grad():
        assert_matches(PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval(), model, run(model, ids), ids)


def test_auto_rank_keeps_the_energy_and_writes_a_rank_pattern(tmp_path):
    base, model, ids = trained("llama", "delora", rank=4, steps=5)
    energy = 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        path = export_peft(model, tmp_path / "a", max_rank="auto", energy=energy)
    tensors, errors = stored(path)
    config = json.loads((path / "adapter_config.json").read_text())
    ranks = {}
    for name, D in exact_updates(model).items():
        S2 = torch.linalg.svdvals(D).square()
        k = tensors[f"base_model.model.{name}.lora_A.weight"].shape[0]
        assert S2[:k].sum() / S2.sum() >= energy - 1e-9 and (k == 1 or S2[:k - 1].sum() / S2.sum() < energy)
        assert k == energy_rank(S2.sqrt(), energy)
        assert errors[name] == pytest.approx(float((S2[k:].sum() / S2.sum()).sqrt()), rel=1e-4, abs=1e-7)
        ranks[name] = k
    assert len(set(ranks.values())) > 1, "the test needs modules of different ranks"
    for name, k in ranks.items():
        expected = None if k == config["r"] else k
        assert next((v for p, v in config["rank_pattern"].items() if p == "^" + name.replace(".", r"\.")),
                    None) == expected
    client = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    for name, k in ranks.items():  # PEFT built each module at its own rank
        assert client.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == k


@pytest.mark.parametrize("recipe", DORA_RECIPES)
def test_fold_magnitude_is_exact_at_full_rank(tmp_path, recipe):
    """A DoRA adapter folded into plain LoRA loads in PEFT and transformers with
    ``use_dora=False`` and gives the DoRA model's outputs to 1e-5."""
    base, model, ids = trained("llama", recipe)
    export = peft_export(model, fold_magnitude=True)
    assert not export.config["use_dora"] and max(export.rel_errors.values()) < 1e-6
    path = export.save(tmp_path / "f")
    with torch.no_grad():
        ref = run(model, ids)
    hf = copy.deepcopy(base)
    hf.load_adapter(str(path))
    for client in (PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval(), hf.eval()):
        assert_matches(client, model, ref, ids)


def test_randomized_capped_svd_reports_its_true_error():
    """The capped fold uses a randomized range; its reported error is still exact
    and within a hair of the optimum."""
    torch.manual_seed(0)
    D = (torch.randn(200, 30, dtype=torch.float64) @ torch.randn(30, 120, dtype=torch.float64)
         + 1e-2 * torch.randn(200, 120, dtype=torch.float64))
    B, A, err = reduce_dense(D, max_rank=8)
    assert B.shape == (200, 8) and A.shape == (8, 120)
    assert err == pytest.approx(float((D - B @ A).norm() / D.norm()), rel=1e-8)
    S = torch.linalg.svdvals(D)
    assert err <= 1.01 * float((S[8:].square().sum() / S.square().sum()).sqrt())


def test_export_option_errors(tmp_path):
    _, model, _ = trained("llama", "lora", steps=1)
    for bad in (0, -1, 1.5, True, "most"):
        with pytest.raises(AdapterError, match="max_rank"):
            export_peft(model, tmp_path / "x", max_rank=bad)
    for bad in (0, 1.5, -0.1, "all"):
        with pytest.raises(AdapterError, match="energy"):
            export_peft(model, tmp_path / "x", max_rank="auto", energy=bad)
    assert not (tmp_path / "x").exists()
    with pytest.warns(DeprecationWarning, match="max_rank"):
        export_peft(model, tmp_path / "old", rank=1)
