"""The memory-light DoRA linear (``functional._DoRALinear``): it keeps the
layer's output ``z`` instead of the pre-scale ``y`` and recovers ``y = (z − b)/g``.
Gradients equal the pre-scale form's (plain autograd) in fp64, also where ``g = 0``
or ``g`` is tiny (rows recomputed), with a bias and with a trained base weight."""

import pytest
import torch

from lorakit.core import Adapter, functional

F64 = torch.float64


def _inputs(g_values=None, bias=True, train_W=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out, inp, r, tokens = 9, 7, 3, 11
    x = torch.randn(2, tokens, inp, generator=gen, dtype=F64, requires_grad=True)
    W = torch.randn(out, inp, generator=gen, dtype=F64, requires_grad=train_W)
    b = torch.randn(out, generator=gen, dtype=F64, requires_grad=True) if bias else None
    B = torch.randn(out, r, generator=gen, dtype=F64, requires_grad=True)
    A = torch.randn(r, inp, generator=gen, dtype=F64, requires_grad=True)
    g = torch.rand(out, generator=gen, dtype=F64) + 0.5
    if g_values is not None:
        g[: len(g_values)] = torch.tensor(g_values, dtype=F64)
    return x, W, b, B, A, g.requires_grad_()


def _grads(saves, x, W, b, B, A, g):
    z = functional.linear_lowrank(x, W, b, B, A, g, saves=saves)
    go = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    leaves = [t for t in (x, W, b, B, A, g) if t is not None and t.requires_grad]
    return z, torch.autograd.grad(z, leaves, go)


@pytest.mark.parametrize("g_values", [None, [0.0, 0.0], [1e-300, -1e-200, 0.0]], ids=["g>0", "g=0", "g tiny"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_W", [False, True])
@pytest.mark.parametrize("saves", ["output", "recompute"])
def test_same_output_and_gradients_as_the_pre_scale_form(g_values, bias, train_W, saves):
    inputs = _inputs(g_values, bias, train_W)
    z, grads = _grads(saves, *inputs)
    z_ref, grads_ref = _grads("pre-scale", *inputs)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x, W, b, B, A, g = _inputs([0.0])
    x2 = x.reshape(-1, 7)
    for recompute in (False, True):
        fn = lambda *t, r=recompute: functional._LowRankLinear.apply(x2, None, W, *t, r)  # noqa: E731
        torch.autograd.gradcheck(fn, (b, B, A, g))


def test_keeps_the_output_not_the_pre_scale_output():
    """What autograd keeps for one DoRA layer followed by an op that keeps its input
    (SiLU): with the output saved, nothing tokens × out beyond SiLU's own input."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64, bias=False), torch.nn.SiLU())
    Adapter.from_recipe("dora", rank=4).apply(model, targets=["0"])
    x = torch.randn(128, 32)

    def kept(saves):
        model[0].dora_saves = saves  # an argument of the layer's fused linear, not a global switch
        sizes = {}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.setdefault(t.untyped_storage().data_ptr(),
                                                                                  t.numel()) and t, lambda t: t):
            model(x).sum().backward()
        return sum(n for n in sizes.values() if n >= 128 * 64)

    assert kept("output") == 128 * 64  # SiLU's input is the layer's output: one tensor
    assert kept("pre-scale") == 2 * 128 * 64
    assert kept("recompute") == 128 * 64  # SiLU's own input only


def test_recompute_keeps_nothing_tokens_by_out():
    """``dora_saves="recompute"``: where no following op keeps the output, the layer keeps
    nothing of size tokens × out ("output" keeps z); an unknown value is one clear error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64, bias=True))
    Adapter.from_recipe("dora", rank=4).apply(model, targets=["0"])
    x = torch.randn(128, 32)

    def kept(saves):
        model[0].dora_saves = saves
        sizes = {}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.setdefault(t.untyped_storage().data_ptr(),
                                                                                  t.numel()) and t, lambda t: t):
            model(x).sum().backward()
        return sum(n for n in sizes.values() if n >= 128 * 64)

    assert kept("output") == 128 * 64 and kept("recompute") == 0
    with pytest.raises(ValueError, match=r"dora_saves='y': use one of \('output', 'pre-scale', 'recompute'\)"):
        model[0].dora_saves = "y"
    assert model[0].dora_saves == "recompute"  # unchanged (the last value set above)
    with pytest.raises(ValueError, match="dora_saves='y'"):  # the functional form checks too
        functional.linear_lowrank(x, model[0].base.weight, None, *model[0].factors(), saves="y")


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_node_matches_autograd_of_the_plain_ops(dropout, bias):
    """``g = None`` (LoRA), with and without a separate dropout input: the one-node
    backward gives autograd's gradients of ``W x + b + B (A x_low)``."""
    x, W, b, B, A, _ = _inputs(bias=bias, train_W=True)
    x_low = x * torch.linspace(0, 2, x.shape[-1], dtype=F64) if dropout else x
    go = torch.randn(2, 11, 9, generator=torch.Generator().manual_seed(5), dtype=F64)
    leaves = [t for t in (x, W, b, B, A) if t is not None]
    z = functional.linear_lowrank(x, W, b, B, A, x_low=x_low)
    z_ref = torch.nn.functional.linear(x, W, b) + (x_low @ A.T) @ B.T
    torch.testing.assert_close(z, z_ref, rtol=1e-13, atol=1e-13)
    for a, r in zip(torch.autograd.grad(z, leaves, go, retain_graph=True), torch.autograd.grad(z_ref, leaves, go)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_sees_every_nan_and_inf(dtype):
    """``functional.all_finite`` (merge's check): one aminmax, NaN and ±inf anywhere."""
    t = torch.randn(37, 23).to(dtype)
    assert functional.all_finite(t)
    for index in [(0, 0), (36, 22), (17, 5)]:
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u[index] = bad
            assert not functional.all_finite(u)


@pytest.mark.parametrize("recipe", ["lora", "dora"])
def test_check_merge_raises_exactly_when_merged_weight_does(recipe):
    """merge's cheap pre-check (a bound on |W_eff|) never lets a bad merge through:
    a NaN, or a value beyond an fp16 base's range, still raises MergeError."""
    from lorakit.core import MergeError, adapted_layers

    for poison, dtype in ((None, torch.float16), (float("nan"), torch.float32), (1e6, torch.float16)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6)).to(dtype)
        Adapter.from_recipe(recipe, rank=2, dtype=torch.float32).apply(model, targets=["0"])
        layer = adapted_layers(model)["0"]
        with torch.no_grad():
            layer.slots.B.fill_(0.1 if poison is None else poison)
        try:
            layer.merged_weight("0")
        except MergeError:
            with pytest.raises(MergeError):
                layer.check_merge("0")
        else:  # (DoRA's W_eff = m·V/‖V‖ stays in range however large B is)
            assert poison is None or recipe == "dora"
            layer.check_merge("0")
