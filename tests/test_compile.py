"""torch.compile (docs/design.md, "Work and memory per forward"): every recipe and combination of registered
primitives compiles with ``fullgraph=True`` (zero graph breaks), over training steps
and eval forwards, with no recompile after the first compile of each mode, and the
compiled model computes what the eager model computes (outputs and gradients).

Expected graphs: one for training (grad on) and one for eval (``no_grad``) — the
mode is an explicit flag the guards see; ``merged``/``disabled`` are two more
modes. After each mode has been compiled once, switching between them any number
of times must not recompile (``torch._dynamo.config.error_on_recompile``).

CI runs the ``aot_eager`` backend (traces forward and backward through AOTAutograd,
no code generation) over every recipe and a set of combinations covering every
registered primitive, plus one small ``inductor`` run; all combinations are
``slow``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

from lorakit.conformance import Combo, combinations
from lorakit.core import adapted_layers, merge, registry, set_enabled, unmerge

STEPS = 10
DEVICE = os.environ.get("LORAKIT_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh compiles on cuda


def recipe_combos() -> dict[str, Combo]:
    return {name: Combo(**r.composition()) for name, r in sorted(registry.load().recipes.items())}


def covering_combos() -> list[Combo]:
    """Few combinations in which every registered primitive (default arguments)
    occurs at least once, each with and without a magnitude head."""
    chosen, seen = [], set()
    for combo in combinations():
        parts = {(k, str(getattr(combo, k))) for k in ("generator", "normalizer", "init")}
        parts.add(("magnitude", str(combo.magnitude)))
        if not parts <= seen:
            chosen.append(combo)
            seen |= parts
    return chosen


def build(combos: list[Combo], dtype=torch.float32, dropout: float = 0.0) -> nn.Sequential:
    """A chain of blocks, block i adapted by ``combos[i]``: each block is two
    rectangular linear layers with biases, so one compiled graph covers many
    combinations (one trace instead of one per combination)."""
    blocks = []
    for i, combo in enumerate(combos):
        torch.manual_seed(i)
        block = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 12), nn.Tanh()).to(dtype)
        blocks.append(combo.adapter(rank=4, seed=i, dropout=dropout).apply(block, targets=["0", "2"]))
    return nn.Sequential(*blocks)


class CountingBackend:
    """Wraps a registered backend and counts the graphs dynamo hands it."""

    def __init__(self, name: str):
        self.backend = lookup_backend(name)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def close(actual, expected, what, dtype=torch.float32):
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def check_compiles(combos: list[Combo], backend: str = "aot_eager", steps: int = STEPS,
                   dtype=torch.float32, dropout: float = 0.0) -> None:
    """Compile a chain of ``combos``; train ``steps`` steps, switching to eval after
    each, next to an eager copy; compare loss, every gradient and eval outputs.
    With ``dropout``, each training step of both copies starts from the same RNG
    state: ``aot_eager`` draws the masks from the global generator as eager does."""
    dynamo.reset()
    model = build(combos, dtype, dropout).to(DEVICE)
    eager = copy.deepcopy(model)
    counter = CountingBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    opts = {id(m): torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
            for m in (model, eager)}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 12, generator=g, dtype=dtype).to(DEVICE)
    target = torch.randn(6, 12, generator=g, dtype=dtype).to(DEVICE)
    label = lambda name: f"{name} ({combos[int(name.split('.')[0])]})"

    def train_step(module, fn):
        module.train()
        opt = opts[id(module)]
        opt.zero_grad(set_to_none=True)
        with torch.random.fork_rng():
            torch.manual_seed(7)
            loss = (fn(x) - target).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        opt.step()
        return loss.detach(), grads

    def eval_out(module, fn):
        module.eval()
        with torch.no_grad():
            return fn(x)

    def one_round(i):
        (loss_c, grads_c), (loss_e, grads_e) = train_step(model, compiled), train_step(eager, eager)
        close(loss_c, loss_e, f"step {i}: loss", dtype)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            close(grads_c[name], grads_e[name], f"step {i}: gradient of {label(name)}", dtype)
        close(eval_out(model, compiled), eval_out(eager, eager), f"step {i}: eval output", dtype)

    one_round(0)  # the first compile of each mode: train, eval
    assert counter.graphs == 2, f"expected one train and one eval graph, got {counter.graphs}"
    with dynamo.config.patch(error_on_recompile=True):
        for i in range(1, steps + 1):
            one_round(i)
    assert counter.graphs == 2


def test_recipes_and_primitives_compile_without_breaks_or_recompiles():
    """Every registered recipe, and every registered primitive in at least one
    combination: 10 training steps with an eval forward after each."""
    recipes = list(recipe_combos().values())
    check_compiles(recipes + [c for c in covering_combos() if c not in recipes])


def test_recipes_compile_with_dropout():
    """Dropout on the adapter branch: still one train and one eval graph, no
    break, no recompile, and the same masks give the same loss and gradients."""
    check_compiles(list(recipe_combos().values()), steps=3, dropout=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("combo", combinations(), ids=str)
def test_each_combination_compiles(combo):
    """One graph per combination: a failure names the combination."""
    check_compiles([combo])


@pytest.mark.slow
def test_recipes_compile_float64():
    check_compiles(list(recipe_combos().values()), dtype=torch.float64)


def test_mode_flags_compile_once_each():
    """train, eval, merged and disabled: one graph each, then no recompiles while
    switching between them, and each mode computes what eager computes."""
    dynamo.reset()
    recipes = recipe_combos()
    model = build([recipes[n] for n in ("lora", "dora", "op-dora", "delora")])
    eager = copy.deepcopy(model)
    counter = CountingBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for m in (model, eager):  # move away from identity so that every mode differs
            for i, p in enumerate(m.parameters()):
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))

    def run(mode):
        out = []
        for m, fn in ((model, compiled), (eager, eager)):
            m.train(mode == "train")
            set_enabled(m, mode != "disabled")
            if mode == "merged":
                merge(m)
            with torch.set_grad_enabled(mode == "train"):
                out.append(fn(x).detach())
            if mode == "merged":
                unmerge(m)
        close(out[0], out[1], f"mode {mode}")
        return out[0]

    modes = ["train", "eval", "merged", "disabled"]
    outs = {mode: run(mode) for mode in modes}
    assert not torch.allclose(outs["eval"], outs["disabled"])
    assert counter.graphs == len(modes)
    with dynamo.config.patch(error_on_recompile=True):
        for mode in modes[::-1] + modes + ["eval", "train", "disabled", "train"]:
            run(mode)
    assert counter.graphs == len(modes)
    assert all(not layer.merged for layer in adapted_layers(model).values())


def test_inductor_compiles():
    """The real code generator once, small (a cold inductor compile takes a minute)."""
    check_compiles([recipe_combos()["lora"]], backend="inductor", steps=2)


@pytest.mark.slow
def test_inductor_compiles_recipes():
    check_compiles(list(recipe_combos().values()), backend="inductor")
