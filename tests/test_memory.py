"""Work and memory per forward (docs/design.md, "Work and memory per forward").

1. Nothing of size out × in is allocated in forward or backward, for every
   combination of registered primitives, on a rectangular 512 × 384 layer: every
   tensor an aten op allocates is recorded (a ``TorchDispatchMode`` sees each op of
   the forward and of the autograd backward) and none may be out × in-sized. The
   base weight itself is a parameter, not an allocation; merging is allowed to
   materialize ``W_eff`` (and the detector is shown to catch it, and PEFT's DoRA).
2. A generator is evaluated once per layer forward, and not at all in eval mode
   under ``no_grad`` once its output is cached.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorakit.conformance import Combo, combinations
from lorakit.core import Adapter, adapted_layers, registry

OUT, IN = 512, 384
TOKENS = (3, 2)  # batch × sequence: activations stay far below out × in


class Allocations(TorchDispatchMode):
    """Records ``(op, shape)`` of every tensor an op returns in *new* storage
    (views and in-place results share their input's storage and are skipped)."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.records.append((str(func), tuple(t.shape)))
        return out

    def large(self, allowed_shapes=()) -> list[tuple[str, tuple[int, ...]]]:
        """Allocations with at least out·in/4 elements, except the given shapes
        (gradients of trainable parameters have their parameter's shape)."""
        return [(op, shape) for op, shape in self.records
                if _numel(shape) >= OUT * IN // 4 and shape not in allowed_shapes]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def layer_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, OUT)).to(dtype)


def check_no_out_by_in(combo: Combo, dtype=torch.float32, rank: int = 8) -> None:
    model = combo.adapter(rank=rank).apply(layer_model(dtype), targets=["0"])
    x = torch.randn(*TOKENS, IN, dtype=dtype, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_shapes = {tuple(p.shape) for p in params}
    with Allocations() as train:
        model(x).float().square().sum().backward()
    assert train.records, "the recorder saw nothing"
    assert all(p.grad is not None for p in params)
    assert not train.large(grad_shapes), f"{combo} ({dtype}): out x in allocations in training: {train.large()}"
    model.eval()
    with Allocations() as evaluation, torch.no_grad():
        model(x)
        model(x)
    assert not evaluation.large(), f"{combo} ({dtype}): out x in allocations in eval: {evaluation.large()}"


@pytest.mark.parametrize("combo", combinations(), ids=str)
def test_no_out_by_in_allocation(combo):
    check_no_out_by_in(combo)


@pytest.mark.parametrize("name", ["lora", "dora", "op-dora", "delora", "loldu", "pissa"])
def test_no_out_by_in_allocation_bf16_base_fp32_adapter(name):
    """A bf16 base with the adapter in fp32: nothing casts W̄ to fp32."""
    check_no_out_by_in(Combo(**registry.load().recipe(name).composition()), dtype=torch.bfloat16)


def test_detector_catches_out_by_in():
    """Positive controls: merging materializes W_eff, and PEFT's DoRA forms B A and
    W + B A; the recorder must flag both."""
    model = Adapter.from_recipe("dora", rank=8).apply(layer_model(), targets=["0"])
    with Allocations() as rec:
        adapted_layers(model)["0"].effective_weight()
    assert (OUT, IN) in [shape for _, shape in rec.large()]

    config = peft.LoraConfig(r=8, lora_alpha=8, use_dora=True, target_modules=["0"])
    theirs = peft.get_peft_model(layer_model(), config)
    x = torch.randn(*TOKENS, IN)
    with Allocations() as rec:
        theirs(x).square().sum().backward()
    assert (OUT, IN) in [shape for _, shape in rec.large()]


# -- generators: evaluated once per layer forward, cached in eval --------------------
def count_generator_calls(model: nn.Module) -> list[int]:
    calls = [0]
    for layer in adapted_layers(model).values():
        layer.slots.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("generator", sorted(registry.load().primitives["generator"]))
@pytest.mark.parametrize("magnitude", [None, "dora"])
def test_generator_evaluated_once_per_forward(generator, magnitude):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    Adapter(generator=generator, magnitude=magnitude, rank=4).apply(model, targets=["0", "2"])
    calls = count_generator_calls(model)
    x = torch.randn(5, 16)

    model(x).square().sum().backward()
    assert calls[0] == 2, "train: once per layer per forward, nothing in backward"
    model(x)
    assert calls[0] == 4

    model.eval()
    with torch.no_grad():
        y = model(x)
        for _ in range(3):
            assert torch.equal(model(x), y)
    assert calls[0] == 6, "eval under no_grad: computed once, then cached"
    model(x)  # eval with autograd on: recomputed so that gradients reach the generator
    assert calls[0] == 8

    model.train()
    model.eval()
    with torch.no_grad():
        model(x)
    assert calls[0] == 10, "a mode switch drops the cache"
