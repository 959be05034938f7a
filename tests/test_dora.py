"""DoRA magnitude head (Liu et al., 2024): PEFT's DoRA as reference (outputs and
gradients), exact identity at init, and no out x in tensor in forward or backward."""

import copy

import peft
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorakit.core import Adapter, adapted_layers
from lorakit.initializers import Kaiming
from lorakit.magnitudes import DoRA
from lorakit.normalizers import Scale

F64 = torch.float64


def tiny_model(dtype=F64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 20)).to(dtype)


def test_recipe_and_exact_identity_at_init():
    model = tiny_model()
    W = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2")}
    x = torch.randn(4, 16, dtype=F64)
    y0 = model(x)
    Adapter.from_recipe("dora", rank=4).apply(model, targets=["0", "2"])
    for name, layer in adapted_layers(model).items():
        assert isinstance(layer.magnitude, DoRA)
        torch.testing.assert_close(layer.slots.m, W[name].norm(dim=1), rtol=1e-15, atol=0)
        assert layer.slots.m.requires_grad
        _, _, g = layer.factors()
        assert torch.equal(g, torch.ones_like(g))  # m / n is exactly 1 at step 0
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_matches_peft_dora(dtype):
    """Same A, B, m copied into ``peft.LoraConfig(use_dora=True)``: same outputs in
    train and eval mode, same gradients for A, B and m (so the same stop-gradient)."""
    base = tiny_model(dtype)
    ours = Adapter(normalizer=Scale(alpha=8), init="kaiming", magnitude="dora", rank=4).apply(
        copy.deepcopy(base), targets=["0", "2"])
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.0, target_modules=["0", "2"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in ("0", "2"):
            slots = ours.get_submodule(i).slots
            slots.B.copy_(0.5 * torch.randn(slots.B.shape, generator=g, dtype=F64))
            slots.m.mul_(1 + 0.2 * torch.randn(slots.m.shape, generator=g, dtype=F64))
            peft_layer = theirs.base_model.model.get_submodule(i)
            peft_layer.lora_A["default"].weight.copy_(slots.A)
            peft_layer.lora_B["default"].weight.copy_(slots.B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(slots.m)
    x = torch.randn(5, 16, generator=g, dtype=F64).to(dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-6}
    y_ours, y_theirs = ours(x), theirs(x)
    assert (y_ours - base(x)).abs().max() > 1e-2
    torch.testing.assert_close(y_ours, y_theirs, **tol)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for i in ("0", "2"):
        slots = ours.get_submodule(i).slots
        peft_layer = theirs.base_model.model.get_submodule(i)
        torch.testing.assert_close(slots.A.grad, peft_layer.lora_A["default"].weight.grad, **tol)
        torch.testing.assert_close(slots.B.grad, peft_layer.lora_B["default"].weight.grad, **tol)
        torch.testing.assert_close(slots.m.grad, peft_layer.lora_magnitude_vector["default"].weight.grad, **tol)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **tol)


class LargeTensors(TorchDispatchMode):
    """Records every newly allocated (non-view) tensor with at least ``limit`` elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel() >= self.limit:
                    self.seen.append((str(func), tuple(t.shape)))
        return out


OUT, IN = 256, 512


def step(model, x):
    """One training step's forward and backward."""
    model(x).square().mean().backward()


@pytest.mark.parametrize("init", [Kaiming(), Kaiming(zero_b=False)], ids=["lora-init", "residualized"])
def test_no_out_by_in_tensor_in_forward_or_backward(init):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT))
    x = torch.randn(3, IN)
    Adapter(init=init, magnitude="dora", rank=8).apply(model, targets=["0"])
    with torch.no_grad():
        model[0].slots.B.normal_()  # as after training: V ≠ W̄
    with LargeTensors(OUT * IN) as rec:
        step(model, x)
    assert model[0].slots.m.grad is not None and model[0].slots.A.grad.abs().sum() > 0
    assert rec.seen == [], f"out x in sized tensors allocated: {rec.seen}"


def test_allocation_recorder_sees_forward_and_backward():
    """The recorder above can fail: it flags a naive DoRA norm (forward) and a
    trainable base weight's gradient (backward only)."""
    torch.manual_seed(0)
    W, B, A = torch.randn(OUT, IN), torch.randn(OUT, 8), torch.randn(8, IN)
    with LargeTensors(OUT * IN) as rec:
        (W + B @ A).norm(dim=1)
    assert rec.seen
    layer = nn.Linear(IN, OUT)
    x = torch.randn(3, IN)
    y = layer(x).square().mean()
    with LargeTensors(OUT * IN) as rec:
        y.backward()
    assert (OUT, IN) in [shape for _, shape in rec.seen]
