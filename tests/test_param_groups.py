"""``lorakit.core.optim.param_groups``: per-slot learning rates and weight decay."""

import tempfile

import pytest
import torch
from torch import nn

from lorakit.core import Adapter, AdapterError, load_optimizer, save
from lorakit.core.optim import param_groups


def model_with(recipe, rank=4, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 20))
    return Adapter.from_recipe(recipe, rank=rank, **kw).apply(model, targets=["0", "2"])


def by_param(groups):
    """``id(param) → (lr, weight_decay, group name)``; every parameter at most once."""
    out = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = (group["lr"], group["weight_decay"], group["name"])
    return out


def check_covers_trainable(model, groups):
    seen = by_param(groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable


def test_delora_lambda_lr_and_loraplus():
    model = model_with("delora")
    groups = param_groups(model, 1e-3, weight_decay=0.1, lambda_lr=5e-2, loraplus_ratio=16)
    check_covers_trainable(model, groups)
    info = by_param(groups)
    for i in ("0", "2"):
        slots = model.get_submodule(i).slots
        assert info[id(slots.A)] == (1e-3, 0.1, "A")
        assert info[id(slots.B)] == (16e-3, 0.1, "B")  # LoRA+: lr_B = ratio · lr_A
        assert info[id(slots.lambda_)] == (5e-2, 0.0, "lambda_")  # own lr, no weight decay
    # defaults: one learning rate; still no weight decay on the scalar λ
    info = by_param(param_groups(model, 1e-3, weight_decay=0.1))
    assert info[id(model[0].slots.lambda_)][:2] == (1e-3, 0.0)
    assert info[id(model[0].slots.B)][:2] == (1e-3, 0.1)


def test_vectors_get_no_weight_decay():
    dora = model_with("dora")
    info = by_param(param_groups(dora, 1e-3, weight_decay=0.1, lambda_lr=1.0))
    assert info[id(dora[0].slots.m)] == (1e-3, 0.0, "m")  # a vector, not a scalar: base lr
    loldu = model_with("loldu")
    groups = param_groups(loldu, 1e-3, weight_decay=0.1, lambda_lr=1e-2)
    check_covers_trainable(loldu, groups)
    info = by_param(groups)
    assert info[id(loldu[0].slots.d)][:2] == (1e-3, 0.0)
    assert info[id(loldu[0].slots.sigma)][:2] == (1e-2, 0.0)  # LoLDU's σ is a scalar slot


def test_generated_and_other_parameters_take_the_base_lr():
    model = model_with("op-lora")
    model[1] = nn.Linear(12, 12)  # a trainable non-adapter module (a head, say)
    groups = param_groups(model, 1e-3, weight_decay=0.1, loraplus_ratio=4, lambda_lr=9.0)
    check_covers_trainable(model, groups)
    info = by_param(groups)
    generated = list(model[0].slots.parameters())
    assert generated and all(info[id(p)][0] == 1e-3 for p in generated)
    assert all("generator" in info[id(p)][2].split("+") for p in generated)
    assert all(info[id(p)][1] == (0.1 if p.dim() >= 2 else 0.0) for p in generated)
    assert info[id(model[1].weight)] == (1e-3, 0.1, info[id(model[1].weight)][2])
    assert info[id(model[1].bias)][1] == 0.0


def test_slots_a_generator_does_not_compute_are_still_slots():
    """DeLoRA's λ under OP-LoRA's MLP is a plain parameter slot: it gets lambda_lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    Adapter(generator="mlp", normalizer="delora", init={"name": "kaiming", "args": {"zero_b": False}},
            rank=4).apply(model, targets=["0"])
    info = by_param(param_groups(model, 1e-3, lambda_lr=0.2, loraplus_ratio=8))
    lam = [p for n, p in model.named_parameters() if n.endswith("lambda_")]
    assert len(lam) == 1 and info[id(lam[0])] == (0.2, 0.0, "lambda_")
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("lambda_")]
    assert others and all(info[id(p)][0] == 1e-3 for p in others)  # no B parameter to boost


def test_slot_lr_override_and_bad_values():
    model = model_with("delora")
    info = by_param(param_groups(model, 1e-3, lambda_lr=1e-2, slot_lr={"lambda_": 0.5, "A": 2e-3}))
    assert info[id(model[0].slots.lambda_)][0] == 0.5
    assert info[id(model[0].slots.A)][0] == 2e-3
    with pytest.raises(AdapterError, match="lambda_lr"):
        param_groups(model, 1e-3, lambda_lr=-1)
    with pytest.raises(AdapterError, match="lr"):
        param_groups(model, "fast")


def test_optimizer_steps_and_checkpoints():
    """The groups feed torch optimizers and survive lorakit's optimizer checkpoint."""
    model = model_with("delora")
    x = torch.randn(4, 16)
    opt = torch.optim.AdamW(param_groups(model, 1e-2, weight_decay=0.01, lambda_lr=1e-1, loraplus_ratio=4))
    lam = model[0].slots.lambda_.detach().clone()
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    # Adam's first step moves each parameter by ~lr: λ by ~0.1, A by ~0.01
    assert (model[0].slots.lambda_ - lam).abs().item() == pytest.approx(0.1, rel=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tmp, optimizer=opt)
        opt2 = torch.optim.AdamW(param_groups(model, 1e-2, weight_decay=0.01, lambda_lr=1e-1, loraplus_ratio=4))
        load_optimizer(opt2, tmp)
    assert [(g["lr"], g["weight_decay"], g["name"]) for g in opt2.param_groups] == \
           [(g["lr"], g["weight_decay"], g["name"]) for g in opt.param_groups]
