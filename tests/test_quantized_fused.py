"""Quantized bases take the one-node fused linear (``LayerKind.fused_weight``): bitsandbytes
nf4/fp4/int8 and torchao nf4/int8 give the same outputs and gradients as the generic path
(``linear`` + ``lowrank`` under autograd) for every recipe, in fp64 where the kind computes
in fp64 (bitsandbytes' 4-bit kernel does not: fp32 there, ≤ 1e-6 relative), and the fused
node keeps nothing of ``W̄`` for backward."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lorakit.core import Adapter, adapted_layers, registry
from lorakit.core.layer_kinds import KernelOperator, LinearKind, plain_tensors

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
RECIPES = sorted(registry.load().recipes)
DEVICE = os.environ.get("LORAKIT_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh runs these on cuda
# (library, mode, dtype the comparison runs in): fp64 where the kind's CPU kernel computes in it
F64 = torch.float64 if DEVICE == "cpu" else torch.float32
KINDS = [("bitsandbytes", "nf4", torch.float32), ("bitsandbytes", "fp4", torch.float32),
         ("bitsandbytes", "int8", F64), ("torchao", "nf4", F64), ("torchao", "int8", torch.float32)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def quantized_model(library: str, mode: str, dtype: torch.dtype, bias: bool = True) -> nn.Module:
    pytest.importorskip(library)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=bias), nn.SiLU(), nn.Linear(128, 64, bias=bias)).to(DEVICE, dtype)
    if library == "bitsandbytes":
        from lorakit.bitsandbytes import quantize

        return quantize(model, mode, skip=(), **({} if mode == "int8" else {"compute_dtype": dtype}))
    from lorakit.torchao import quantize

    return quantize(model, mode, skip=(), **({"scaler_block_size": 32} if mode == "nf4" else {}))


def outputs_and_grads(model: nn.Module, x: torch.Tensor, fused: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    for layer in adapted_layers(model).values():
        layer.fused = fused
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask on both paths
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)).square().mean().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {**out, "x.grad": x.grad, "y": y.detach()}


def adapted(library, mode, dtype, recipe, **kw):
    model = quantized_model(library, mode, dtype, bias=kw.pop("model_bias", True))
    Adapter.from_recipe(recipe, rank=4, dtype=dtype, **kw).apply(model, targets=["0", "2"])
    torch.manual_seed(1)
    with torch.no_grad():  # away from init, where some gradients vanish
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def fp64_reference(model: nn.Module) -> nn.Module:
    """The adapted model on dense fp64 bases holding ``W̄`` (exact: dequantized values are
    fp32 numbers) with the adapter's values: what both paths approximate in fp32."""
    ref = nn.Sequential(*(nn.Linear(layer.shape[1], layer.shape[0], bias=layer.base.bias is not None)
                          if hasattr(layer, "base") else layer for layer in model)).to(DEVICE, torch.float64)
    layers = adapted_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            ref.get_submodule(name).weight.copy_(layer.kind.matrix(layer.base))
            if layer.base.bias is not None:
                ref.get_submodule(name).bias.copy_(layer.base.bias)
    first = next(iter(layers.values()))
    Adapter.from_config({**first.adapter_config, "dtype": "float64"}).apply(ref, targets=list(layers))
    for name, layer in layers.items():
        state = {k: v.double() for k, v in layer.state_dict().items() if not k.startswith("base.")}
        ref.get_submodule(name).load_state_dict(state, strict=False)
        ref.get_submodule(name).base.requires_grad_(layer.base.bias is not None and layer.base.bias.requires_grad)
        ref.get_submodule(name).base.weight.requires_grad_(False)
    return ref


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def assert_same(model: nn.Module, x: torch.Tensor, what: str, seed: int = 0) -> None:
    """Fused against generic. fp64: every tensor within 1e-12 relative. fp32: the output,
    the input gradient and all parameter gradients together within 1e-6 relative; each
    parameter gradient as close to the fp64 reference as the generic path's (within 2×) or
    within 1e-5 (a gradient with cancellation, LoLDU's diagonal, is ~1e-6 from exact on
    either path, in either direction)."""
    fused, generic = outputs_and_grads(model, x, True, seed), outputs_and_grads(model, x, False, seed)
    assert fused.keys() == generic.keys(), what
    if x.dtype == torch.float64:
        for k, ref in generic.items():
            assert _rel(fused[k], ref) <= TOLERANCE[x.dtype], f"{what}: {k} differs by {_rel(fused[k], ref):.2e}"
        return
    exact = outputs_and_grads(fp64_reference(model), x.double(), False, seed)
    params = sorted(set(generic) - {"y", "x.grad"})
    for k in ("y", "x.grad"):
        diff = _rel(fused[k], generic[k])
        assert diff <= TOLERANCE[x.dtype], f"{what}: {k} differs by {diff:.2e}"
    together = _rel(torch.cat([fused[k].flatten() for k in params]), torch.cat([generic[k].flatten() for k in params]))
    assert together <= TOLERANCE[x.dtype], f"{what}: the parameter gradients differ by {together:.2e}"
    for k in params:
        err, own = _rel(fused[k], exact[k]), _rel(generic[k], exact[k])
        assert err <= max(1e-5, 2 * own), f"{what}: {k} is {err:.1e} from fp64 (the generic path: {own:.1e})"


@pytest.mark.parametrize("library,mode,dtype", KINDS, ids=lambda v: str(v).replace("torch.", ""))
def test_every_recipe_fused_equals_the_generic_path(library, mode, dtype):
    x = torch.randn(3, 5, 64, dtype=dtype).to(DEVICE)
    for recipe in RECIPES:
        model = adapted(library, mode, dtype, recipe)
        layers = adapted_layers(model).values()
        assert all(isinstance(layer.kind.fused_weight(layer.base), KernelOperator) for layer in layers)
        assert all(layer.fused for layer in layers), f"{recipe}: a quantized layer did not take the fused path"
        assert_same(model, x, f"{library} {mode} {recipe}")


@pytest.mark.parametrize("library,mode,dtype", KINDS, ids=lambda v: str(v).replace("torch.", ""))
def test_dora_saves_dropout_and_bias_forms_equal_the_generic_path(library, mode, dtype):
    x = torch.randn(2, 7, 64, dtype=dtype).to(DEVICE)
    for saves in ("output", "recompute", "pre-scale"):
        model = adapted(library, mode, dtype, "dora")
        for layer in adapted_layers(model).values():
            layer.dora_saves = saves
        assert_same(model, x, f"dora {saves}")
    # rows of g = 0, where the output does not determine y: recomputed (the operator's whole product)
    model = adapted(library, mode, dtype, "dora")
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.slots.m[:3] = 0
    assert_same(model, x, "dora with g = 0 rows")
    # LoRA with dropout (the fused node takes the dropped input), no bias, a trained bias
    for kw in (dict(dropout=0.2), dict(model_bias=False), dict(bias="all")):
        model = adapted(library, mode, dtype, "lora", **dict(kw))
        assert_same(model, x, f"lora {kw}")


@pytest.mark.parametrize("library,mode,dtype", KINDS, ids=lambda v: str(v).replace("torch.", ""))
def test_the_fused_node_keeps_nothing_of_the_weight(library, mode, dtype):
    """What autograd keeps for backward, per storage: the fused DoRA layer keeps its input,
    ``h``, the factors and its output; no out × in tensor (the generic path through torchao's
    int8 linear keeps a dequantized copy), and no more than the generic path in all."""
    x = torch.randn(3, 7, 64, dtype=dtype).to(DEVICE)  # 21 tokens: no activation of a weight's size
    model = adapted(library, mode, dtype, "dora")
    kept = {}
    for fused in (True, False):
        for layer in adapted_layers(model).values():
            layer.fused = fused
        saved: dict[int, int] = {}

        def pack(t, saved=saved):
            for inner in plain_tensors(t).values():  # a torchao weight by the tensors holding its bytes
                saved[inner.untyped_storage().data_ptr()] = inner.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x.clone().requires_grad_(True))
        y.sum().backward()
        kept[fused] = saved
    weights = {64 * 128 * torch.finfo(dtype).bits // 8}
    assert not weights & set(kept[True].values()), "the fused node kept a dequantized weight"
    assert sum(kept[True].values()) <= sum(kept[False].values())


def test_fused_weight_is_the_capability_not_the_class():
    """A LinearKind subclass that changes the math, or an nn.Linear overriding forward, takes
    the generic path; a plain nn.Linear's fused weight is its weight."""
    linear = nn.Linear(4, 3)
    assert LinearKind().fused_weight(linear) is linear.weight

    class Doubled(LinearKind):
        def linear(self, base, x):
            return 2 * super().linear(base, x)

    class Exports(LinearKind):
        exports = frozenset({"peft"})

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert Doubled().fused_weight(linear) is None
    assert Exports().fused_weight(linear) is linear.weight
    assert LinearKind().fused_weight(Scaled(4, 3)) is None


@pytest.mark.parametrize("variant", [dict(mode="nf4"), dict(mode="fp4"), dict(mode="nf4", double_quant=True),
                                     dict(mode="nf4", compute_dtype=torch.bfloat16), dict(mode="int8")], ids=str)
def test_bitsandbytes_linear_t_is_the_dense_product(variant, monkeypatch):
    """``gy W̄`` against fp64 with the dequantized weight (41 × 96: the last quantization
    block partial); int8 over row blocks too (one, several, one row at a time)."""
    pytest.importorskip("bitsandbytes")
    from lorakit.bitsandbytes import kinds, quantize

    mode = variant.pop("mode")
    torch.manual_seed(0)
    model = quantize(nn.Sequential(nn.Linear(96, 41)).to(DEVICE), mode, skip=(), **variant)
    base = model[0]
    kind = registry.load().layer_kind(base)
    gy = torch.randn(7, 41, device=DEVICE)
    dtype = torch.float32 if mode == "int8" else variant.get("compute_dtype", torch.float32)
    exact = gy.to(dtype).double() @ kind.matrix(base).double()
    for elements in (1 << 22, 96 * 5, 1):
        monkeypatch.setattr(kinds, "BLOCK_ELEMENTS", elements)
        got = kind.linear_t(base, gy)
        assert got.shape == (7, 96) and got.dtype == gy.dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 compute: the product is in bf16
        assert _rel(got, exact) <= tol, (elements, _rel(got, exact))
