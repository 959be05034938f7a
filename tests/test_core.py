"""lorakit.core behaviour beyond the conformance properties: targeting, modes, reports,
export reduction, checkpoints, CLI."""

import json
import math

import pytest
import torch
from torch import nn

from lorakit.core import (
    AdaptedLayer,
    Adapter,
    adapted_layers,
    disabled,
    export_factors,
    load,
    merge,
    merge_and_unload,
    parameter_report,
    save,
    set_enabled,
    unload,
)
from lorakit.core.cli import main
from lorakit.core.functional import reduce_lowrank, row_sq_norms_of_sum


class Block(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.mlp = nn.Linear(d, 2 * d)

    def forward(self, x):
        return self.mlp(torch.tanh(self.q_proj(x) + self.v_proj(x)))


def toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(Block(), nn.ReLU(), nn.Linear(24, 12))


def train_steps(model, x, n=3, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_apply_targets_by_name_and_regex(capsys):
    model = Adapter(rank=2).apply(toy(), targets=["q_proj", "v_proj"], verbose=True)
    assert sorted(adapted_layers(model)) == ["0.q_proj", "0.v_proj"]
    assert "adapted 2 modules" in capsys.readouterr().out
    model = Adapter(rank=2).apply(toy(), targets=r".*proj|2")
    assert sorted(adapted_layers(model)) == ["0.q_proj", "0.v_proj", "2"]


def test_only_adapter_parameters_train_and_report_counts():
    model = Adapter(rank=3).apply(toy(), targets=["q_proj", "v_proj", "mlp"])
    report = parameter_report(model)
    # A (r×in) + B (out×r) per layer; d stays fixed under the direct generator
    expected = sum(3 * (i + o) for i, o in [(12, 12), (12, 12), (12, 24)])
    assert report["trainable"] == expected
    assert report["per_slot"] == {"A": 3 * 36, "B": 3 * 48}
    assert all(".slots." in n for n, p in model.named_parameters() if p.requires_grad)


def test_disable_enable_and_context():
    x = torch.randn(5, 12)
    model = toy()
    base = model(x).detach()
    Adapter(rank=2).apply(model, targets=["q_proj"])
    train_steps(model, x)
    adapted = model(x).detach()
    assert not torch.allclose(adapted, base)
    with disabled(model):
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), adapted)
    set_enabled(model, False)
    assert torch.equal(model(x), base)
    set_enabled(model, True)
    assert torch.equal(model(x), adapted)


def test_merge_and_unload_gives_plain_model():
    x = torch.randn(5, 12)
    model = Adapter(rank=2).apply(toy(), targets=["q_proj", "v_proj"])
    train_steps(model, x)
    y = model(x).detach()
    plain = merge_and_unload(model)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-6)


def test_unload_restores_pretrained():
    x = torch.randn(5, 12)
    model = toy()
    base = model(x).detach()
    Adapter(rank=2).apply(model, targets=["q_proj"])
    train_steps(model, x)
    merge(model)
    unload(model)
    assert not adapted_layers(model)
    torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-6)


def test_rank_pattern_sets_per_module_rank():
    model = Adapter(rank=2, rank_pattern={"mlp": 5}).apply(toy(), targets=["q_proj", "mlp"])
    ranks = {n: layer.rank for n, layer in adapted_layers(model).items()}
    assert ranks == {"0.q_proj": 2, "0.mlp": 5}


def test_row_norm_identity_matches_dense():
    g = torch.Generator().manual_seed(0)
    W, B, A = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(7, 5), (7, 3), (3, 5)])
    dense = (W + B @ A).square().sum(1)
    torch.testing.assert_close(row_sq_norms_of_sum(W, W.square().sum(1), B, A), dense)


@pytest.mark.parametrize("out_f,in_f,r", [(9, 6, 4), (4, 11, 4), (8, 8, 1)])
def test_reduce_lowrank_exact_and_truncated(out_f, in_f, r):
    g = torch.Generator().manual_seed(1)
    B = torch.randn(out_f, 2 * r, generator=g, dtype=torch.float64)
    A = torch.randn(2 * r, in_f, generator=g, dtype=torch.float64)
    B_k, A_k, err = reduce_lowrank(B, A)
    assert B_k.shape[1] == min(out_f, in_f, 2 * r) and err < 1e-12
    torch.testing.assert_close(B_k @ A_k, B @ A)
    B_1, A_1, err1 = reduce_lowrank(B, A, rank=1)
    S = torch.linalg.svdvals(B @ A)
    assert math.isclose(err1, float(S[1:].square().sum().sqrt() / S.square().sum().sqrt()), rel_tol=1e-9)
    true = (B @ A - B_1 @ A_1).norm() / (B @ A).norm()
    assert math.isclose(err1, float(true), rel_tol=1e-9)


def test_export_reports_truncation_error():
    x = torch.randn(5, 12)
    model = Adapter(rank=4).apply(toy(), targets=["q_proj"])
    train_steps(model, x)
    exact = export_factors(model)["0.q_proj"]
    cut = export_factors(model, rank=1)["0.q_proj"]
    assert exact.rel_error < 1e-6 and exact.B.shape[1] <= 4
    assert 0 < cut.rel_error < 1 and cut.B.shape[1] == 1


def test_save_load_roundtrip_with_new_model(tmp_path):
    x = torch.randn(5, 12)
    model = Adapter.from_recipe("lora", rank=2, seed=3).apply(toy(), targets=["q_proj", "v_proj"])
    train_steps(model, x)
    save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["adapter"]["recipe"] == "lora" and config["adapter"]["generator"]["name"] == "direct"
    assert set(config["modules"]) == {"0.q_proj", "0.v_proj"}
    fresh = load(toy(), tmp_path)
    assert torch.equal(fresh(x), model(x))


def test_cli_recipes_and_plugins_json(capsys):
    assert main(["recipes", "--json"]) == 0
    recipes = json.loads(capsys.readouterr().out)
    assert recipes["lora"]["normalizer"]["name"] == "scale"
    assert recipes["rslora"]["normalizer"]["args"] == {"rs": True}
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = {p["name"]: p for p in listing["plugins"]}
    for builtin in ("core", "generators", "normalizers", "initializers", "magnitudes"):
        assert builtin in names
    assert "generator 'direct'" in names["core"]["registered"]  # LoRA's baseline ships with core
    assert "generator 'mlp'" in names["generators"]["registered"]
    assert names["normalizers"]["distribution"] == "lorakit-normalizers"


def test_cli_demo_runs_every_recipe(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "lora " in out and "rslora" in out


def test_train_only_adapter_and_its_former_name():
    import warnings

    import pytest
    from torch import nn

    from lorakit.core import Adapter

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    Adapter(rank=1).apply(model, targets=["0"], train_only_adapter=False)
    assert model[1].weight.requires_grad  # left as it was
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.warns(DeprecationWarning, match="train_only_adapter"):
        Adapter(rank=1).apply(model, targets=["0"], freeze_base=True)
    assert not model[1].weight.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Adapter(rank=1).apply(nn.Sequential(nn.Linear(4, 3)), targets=["0"])


def test_the_adapter_config_lives_on_the_layers_not_the_users_model():
    import copy

    from torch import nn

    from lorakit.core import Adapter, adapter_config, unload

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    Adapter(rank=1).apply(model, targets=["0", "1"])
    assert "lorakit_config" not in vars(model)
    config = adapter_config(model)
    assert config["targets"] == ["0", "1"] and config["rank"] == 1
    wrapper = nn.ModuleDict({"inner": model})  # as DDP/FSDP wrap a model
    assert adapter_config(wrapper) == config
    clone = copy.deepcopy(model)
    assert adapter_config(clone) == config and adapter_config(clone) is not config  # a copy for the caller
    assert clone[0].adapter_config is clone[1].adapter_config  # still one (immutable) record
    assert adapter_config(unload(model)) == {}
