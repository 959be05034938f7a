"""merge / merge_and_unload in one pass per layer (docs/benchmarks.md, "Load and merge").

Every recipe, fp32 and bf16 bases: the factors are computed once per layer (the check's
plan is what the write uses), ``W_eff`` is the one out × in tensor a layer allocates
(plus its cast to a bf16 base; none for a plain fp32 ``nn.Linear`` without a magnitude
head, merged in place), and what is written is bit-identical to the exact path
(:meth:`AdaptedLayer.merged_weight`), including the rows DoRA's unmerge cannot restore.
"""

from __future__ import annotations

import pytest
import torch
from test_memory import IN, OUT, Allocations, _numel
from torch import nn

from lorakit.core import Adapter, adapted_layers, merge, merge_and_unload, registry, unmerge

RECIPES = sorted(registry.load().recipes)


def _model(recipe: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, IN)).to(dtype)
    Adapter.from_recipe(recipe, rank=4).apply(model, targets=["0", "1"])
    with torch.no_grad():  # a trained adapter: every slot away from its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("recipe", RECIPES)
def test_merge_computes_factors_once_and_one_out_by_in(recipe, dtype):
    model = _model(recipe, dtype)
    layers = adapted_layers(model)
    expected = {n: layer.merged_weight(n)[0].clone() for n, layer in layers.items()}
    calls = {n: 0 for n in layers}
    for n, layer in layers.items():
        layer.slots.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
    with Allocations() as rec:
        plain = merge_and_unload(model)
    assert calls == {n: 1 for n in layers}, f"{recipe}: slots evaluated per layer {calls}"
    large = [(op, shape) for op, shape in rec.records if _numel(shape) >= OUT * IN // 4]
    # fp32 nn.Linear without a magnitude head: W += B A in place; with one, W_eff then a copy;
    # a bf16 base: the fp32 W_eff and its bf16 cast
    per_layer = 2 if dtype == torch.bfloat16 else int(any(layer.magnitude for layer in layers.values()))
    assert len(large) == per_layer * len(layers), f"{recipe} ({dtype}): {large}"
    for n, W in expected.items():
        assert torch.equal(plain.get_submodule(n).weight, W), f"{recipe} ({dtype}): {n} differs from merged_weight"


def test_bounded_merge_keeps_the_rows_of_zero_magnitude():
    """The fast path's kept rows (g = 0) are the exact path's, and unmerge restores them bitwise."""
    model = _model("dora", torch.float32)
    layer = adapted_layers(model)["0"]
    with torch.no_grad():
        layer.slots.m[[3, 7]] = 0.0
    W = layer.base.weight.detach().clone()
    _, lost = layer.merged_weight("0")
    plan = layer.check_merge("0")
    assert plan.bounded
    merge(model)
    assert torch.equal(layer._merged_with[3][0], lost[0]) and torch.equal(layer._merged_with[3][1], lost[1])
    unmerge(model)
    assert torch.equal(layer.base.weight[[3, 7]], W[[3, 7]])
    torch.testing.assert_close(layer.base.weight, W, rtol=1e-5, atol=1e-6)
