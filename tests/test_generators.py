"""Generators of the seed-primitives issue: ``MLP`` (OP-LoRA / OP-DoRA) and ``Diagonal``
(LoLDU). Initializers, normalizers and magnitude heads are taken from the registry,
so primitives registered later join these tests automatically."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorakit.core import (
    Adapter,
    AdapterError,
    ParameterSlots,
    Role,
    adapted_layers,
    adapter_config,
    freeze_generators,
    parameter_report,
    registry,
)
from lorakit.core.cli import main
from lorakit.generators import MLP, Diagonal
from lorakit.generators.mlp import MLPSlots

REG = registry.load()
INITS = sorted(REG.primitives["initializer"])
NORMALIZERS = sorted(REG.primitives["normalizer"])
MAGNITUDES = [None, *sorted(REG.primitives["magnitude"])]
MLP_PARAMS = {"z", "W1", "b1", "W2", "b2"}


def model_and_input(dtype=torch.float32, out_f=24, in_f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, 32), nn.Tanh(), nn.Linear(32, out_f))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.to(dtype), torch.randn(5, in_f, generator=g).to(dtype)


def adapt(generator, normalizer="scale", init="kaiming", magnitude=None, rank=4, dtype=torch.float32):
    model, x = model_and_input(dtype)
    Adapter(generator=generator, normalizer=normalizer, init=init, magnitude=magnitude,
            rank=rank, seed=3).apply(model, targets=["0", "2"])
    return model, x


def train_steps(model, x, n=3, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        loss = (model(x) - x.sum(1, keepdim=True)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# -- MLP: step 0 ------------------------------------------------------------------------------
STEP0_CASES = [(i, n, m, torch.float32) for i in INITS for n in NORMALIZERS for m in MAGNITUDES]
STEP0_CASES += [(i, NORMALIZERS[0], MAGNITUDES[-1], torch.float64) for i in INITS]


@pytest.mark.parametrize("init,normalizer,magnitude,dtype", STEP0_CASES, ids=str)
def test_mlp_output_at_step0_is_the_initializers_values_exactly(init, normalizer, magnitude, dtype):
    """Same seed: the initializer draws first, so Direct holds exactly its values."""
    direct, x = adapt("direct", normalizer, init, magnitude, dtype=dtype)
    mlp, _ = adapt(MLP(width=8, embed_dim=6), normalizer, init, magnitude, dtype=dtype)
    for name, layer in adapted_layers(mlp).items():
        assert isinstance(layer.slots, MLPSlots)
        want, got = adapted_layers(direct)[name].slots(), layer.slots()
        assert set(got) == set(want)
        for slot in want:
            assert got[slot].dtype == want[slot].dtype, slot
            assert torch.equal(got[slot], want[slot]), f"{name}.{slot} differs at step 0"
        assert layer.slots.W2.abs().sum() > 0  # the MLP is not degenerate: A rows are Kaiming
    # hence the adapted model is the base model at step 0, exactly as the Direct one
    assert torch.equal(mlp(x), direct(x))


def test_mlp_paper_init():
    """OP-LoRA (arXiv:2412.10362) supp. §2.1: W2 rows producing B (and DoRA's m) zero, biases zero."""
    model, _ = adapt(MLP(width=8, embed_dim=6), magnitude="dora")
    s = adapted_layers(model)["2"].slots
    assert s.generated == ("A", "B", "m")
    nA, nB, nm = s.sizes
    assert (nA, nB, nm) == (4 * 32, 24 * 4, 24)
    assert s.W2[:nA].abs().min() > 0
    assert torch.count_nonzero(s.W2[nA:]) == 0
    assert torch.count_nonzero(s.b1) == 0 and torch.count_nonzero(s.b2) == 0
    assert s.W1.abs().max() <= 6 ** -0.5 and s.W2.abs().max() <= 8 ** -0.5  # Kaiming-uniform, a=√5
    assert s.z.std() < 0.05  # z0 ~ N(0, 0.01²), the documented default


# -- MLP: gradients, parameter count ------------------------------------------------------------
@pytest.mark.parametrize("normalizer,scalars", [
    ({"name": "scale", "args": {"learnable": True}}, {"sigma"}),
    *([("delora", {"lambda_"})] if "delora" in NORMALIZERS else []),
])
def test_gradients_reach_only_the_mlp_and_normalizer_scalars(normalizer, scalars):
    # B0 != 0 so that every MLP parameter gets a non-zero gradient at step 0
    model, x = adapt(MLP(8, 6), normalizer, {"name": "kaiming", "args": {"zero_b": False}})
    model(x).square().mean().backward()
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == MLP_PARAMS | scalars
    for name, p in model.named_parameters():
        if ".base." in name:
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    for layer in adapted_layers(model).values():  # A, B generated; d and the rest plain
        rest = layer.slots.rest
        assert "d" in dict(rest.named_buffers()) and {n for n, _ in rest.named_parameters()} == scalars
        assert not {"A", "B"} & set(rest.names)


@pytest.mark.parametrize("magnitude", MAGNITUDES, ids=str)
def test_parameter_count_formula(magnitude):
    width, embed, r = 8, 6, 4
    model, _ = adapt(MLP(width, embed), magnitude=magnitude, rank=r)
    expected = 0
    for out_f, in_f in ((32, 16), (24, 32)):
        P = r * in_f + out_f * r + (out_f if magnitude else 0)  # generated A, B (, m)
        expected += embed + width * (embed + 1) + (width + 1) * P
    assert parameter_report(model)["trainable"] == expected
    # OP-LoRA §4: "an MLP of hidden dimension 32 scales the trainable parameters by ~32"
    model, _ = model_and_input(out_f=256, in_f=256)
    Adapter.from_recipe("op-lora", rank=8).apply(model, targets=["0"])
    lora = 8 * (256 + 32)
    assert 33 <= parameter_report(model)["trainable"] / lora < 35  # (width + 1) + O(1/P)


# -- MLP: freeze, caching, compile --------------------------------------------------------------
def test_freeze_generators_keeps_outputs_and_drops_the_mlp():
    model, x = adapt(MLP(8, 6), {"name": "scale", "args": {"learnable": True}}, magnitude=MAGNITUDES[-1])
    train_steps(model, x)
    y = model(x).detach()
    before = {n: {k: v.detach().clone() for k, v in layer.slots().items()}
              for n, layer in adapted_layers(model).items()}
    freeze_generators(model)
    assert torch.equal(model(x), y)
    assert not any(n.rsplit(".", 1)[-1] in MLP_PARAMS for n, _ in model.named_parameters())
    for name, layer in adapted_layers(model).items():
        assert isinstance(layer.slots, ParameterSlots)
        values = layer.slots()
        assert all(torch.equal(values[k], before[name][k]) for k in before[name])
        params = {n for n, _ in layer.slots.named_parameters()}
        assert params == {"A", "B", "sigma", *layer.slots.names_with(Role.MAGNITUDE)}  # any head's slot name
    assert adapter_config(model)["generator"]["name"] == "direct"
    train_steps(model, x, n=1)  # the frozen adapter is a plain Direct one and still trains


def count_mlp_calls(model):
    calls = []
    for layer in adapted_layers(model).values():
        layer.slots.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_mlp_runs_once_per_forward_and_once_in_eval():
    model, x = adapt(MLP(8, 6), magnitude=MAGNITUDES[-1])  # the magnitude head reads the slots too
    calls = count_mlp_calls(model)
    model(x).sum().backward()
    assert len(calls) == 2  # training: once per layer per forward
    model.eval()
    with torch.no_grad():
        y = [model(x) for _ in range(4)]
    assert len(calls) == 4  # eval: computed once per layer, then cached
    assert all(torch.equal(v, y[0]) for v in y)
    model.train()  # leaving eval drops the cache
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == 6


def test_mlp_forward_compiles_without_graph_breaks():
    model, x = adapt(MLP(8, 6), magnitude=MAGNITUDES[-1])
    layer = adapted_layers(model)["2"]
    torch._dynamo.reset()
    compiled = torch.compile(layer.slots, fullgraph=True, backend="eager")
    got, want = compiled(), layer.slots()
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- MLP: bad input, recipes ------------------------------------------------------------------
@pytest.mark.parametrize("args", [{"width": 0}, {"embed_dim": 0}, {"width": -3}, {"width": 2.5},
                                  {"embed_dim": True}, {"z_std": -1.0}, {"z_std": float("nan")},
                                  {"start": "paper"}, {"gain": 1.0}, {"gain": float("inf")}, {"gain": True}])
def test_bad_mlp_arguments_are_clear_errors(args):
    with pytest.raises(AdapterError, match="MLP\\(") as err:
        MLP(**args)
    assert next(iter(args)) in str(err.value)
    model, x = model_and_input()
    before = model(x)
    with pytest.raises(AdapterError):
        Adapter(generator={"name": "mlp", "args": args}).apply(model, targets=["0"])
    assert not adapted_layers(model) and torch.equal(model(x), before)  # model unchanged


def test_recipes_are_json_and_compose():
    rows = {name: REG.recipe(name).composition() for name in ("op-lora", "op-dora", "loldu")}
    assert json.loads(json.dumps(rows)) == rows
    assert rows["op-lora"]["generator"] == {"name": "mlp", "args": {"width": 32}}
    assert rows["op-dora"]["magnitude"] == {"name": "dora", "args": {}}
    assert rows["loldu"]["generator"]["name"] == "diagonal"
    assert rows["loldu"]["normalizer"] == {"name": "scale", "args": {"learnable": True}}
    assert rows["loldu"]["init"]["name"] == "ldu"


@pytest.mark.skipif("dora" not in MAGNITUDES, reason="needs the dora magnitude (lorakit-magnitudes)")
def test_op_dora_generates_the_magnitude():
    model, x = model_and_input()
    Adapter.from_recipe("op-dora", rank=4).apply(model, targets=["0", "2"])
    layer = adapted_layers(model)["2"]
    assert "m" in layer.slots.generated and "m" not in dict(layer.slots.rest.named_parameters())
    m0 = layer.slots()["m"].detach().clone()
    assert torch.equal(m0, layer.row_sq_norm.sqrt())  # m0 = ‖W̄_i‖, the DoRA init, exactly
    train_steps(model, x, n=3)
    m = layer.slots()["m"].detach()
    assert not torch.equal(m, m0)
    nA, nB, nm = layer.slots.sizes
    assert layer.slots.W2[nA + nB:].abs().sum() > 0  # Δm rows learnt from zero


# -- Diagonal -----------------------------------------------------------------------------------
def test_diagonal_trains_only_d_and_normalizer_scalars():
    model, x = adapt(Diagonal(), {"name": "scale", "args": {"learnable": True}},
                     {"name": "kaiming", "args": {"zero_b": False}})
    assert Diagonal.trainable_factors == {"A": False, "B": False, "d": True}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.slots.d", "0.slots.sigma", "2.slots.d", "2.slots.sigma"}
    assert parameter_report(model)["trainable"] == 2 * (4 + 1)  # r + σ per layer
    A0 = {n: layer.slots.A.clone() for n, layer in adapted_layers(model).items()}
    before = model(x).detach()
    train_steps(model, x)
    assert not torch.equal(model(x), before)  # d and σ moved the output
    for n, layer in adapted_layers(model).items():
        assert isinstance(layer.slots, ParameterSlots)
        assert torch.equal(layer.slots.A, A0[n])  # factors frozen


def test_cli_rejects_bad_mlp_width(capsys):
    assert main(["mf", "--width", "0", "--steps", "2", "--warmup", "0", "--size", "4", "--rank", "1",
                 "--lrs", "1", "--no-progress"]) == 2
    assert "width" in capsys.readouterr().err


# -- MLP: the authors' start and the stable head -------------------------------------
@pytest.mark.parametrize("init,normalizer,magnitude", [("kaiming", "scale", None), ("pissa", "scale", "dora"),
                                                       ("ldu", "delora", None), ("kaiming", "delora", "dora")])
def test_mlp_start_from_its_own_output(init, normalizer, magnitude):
    """``start="mlp"``: ``A0 = W2_A h(z0)`` (not the initializer's), ``B0 = 0``, a magnitude
    keeps the initializer's value; the adapted model still equals the base at step 0."""
    model, x = model_and_input(torch.float64)
    y0 = model(x)
    Adapter(generator=MLP(start="mlp"), normalizer=normalizer, init=init, magnitude=magnitude, rank=4,
            seed=3).apply(model, targets=["0", "2"])
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-12)
    slots = model[0].slots
    values = slots()
    head = slots._head().detach()
    torch.testing.assert_close(values["A"].reshape(-1), head[:values["A"].numel()], rtol=0, atol=0)
    assert values["A"].abs().max() > 0 and torch.equal(values["B"], torch.zeros_like(values["B"]))
    if magnitude:  # m0 = ‖W̄_i‖ (DoRA), not the zero head rows
        torch.testing.assert_close(values["m"], model[0].base.weight.norm(dim=1), rtol=1e-12, atol=0)
    train_steps(model, x)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in slots.parameters())
    assert not torch.equal(model(x), y0)


def test_mlp_gain_sets_the_jacobian_gram_max_at_init(tmp_path):
    """``gain=g``: ``λ_max(J Jᵀ) = g`` at init (J: generated factors × MLP parameters,
    by autograd), ≈ 16 for the paper's head; the scale survives save/load."""
    from torch.func import functional_call, jacrev

    from lorakit.core import load, save

    def gram_max(slots):
        params = {k: v.detach() for k, v in slots.named_parameters()}
        flat = lambda p: torch.cat([functional_call(slots, p, ())[k].reshape(-1) for k in slots.generated])  # noqa: E731
        K = sum(j.reshape(j.shape[0], -1) @ j.reshape(j.shape[0], -1).T for j in jacrev(flat)(params).values())
        return torch.linalg.eigvalsh(K)[-1].item()

    from lorakit.generators.mlp import jacobian_gram_max

    paper = adapt(MLP(), dtype=torch.float64)[0][0].slots
    assert "head_scale" not in dict(paper.named_buffers())  # the paper's head: checkpoints unchanged
    h_sq, mu = jacobian_gram_max(paper.W1, paper.b1, paper.W2, paper.z)
    assert gram_max(paper) == pytest.approx(1 + h_sq + mu, rel=1e-6)  # the closed form, α = 1
    for gain in (1.5, 4.0):
        model, x = adapt(MLP(gain=gain), dtype=torch.float64)
        assert gram_max(model[0].slots) == pytest.approx(gain, rel=1e-6)
        train_steps(model, x)
        save(model, tmp_path / str(gain))
        fresh = load(model_and_input(torch.float64)[0], tmp_path / str(gain))
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-12)
        assert torch.equal(fresh[0].slots.head_scale, model[0].slots.head_scale)
