"""Your own primitive as a plugin, composed with the built-in ones.

    python examples/custom_primitive_plugin.py [--steps 10] [--rank 4]

``Gated`` is a normalizer: ΔW = tanh(g) · B diag(d) A with one trainable gate ``g`` per
layer, so each layer learns how much of its update to use. Registered through the
same hooks an installed plugin uses, it composes with every generator, initializer
and magnitude head, saves, reloads and merges like the built-ins.

To ship it as a package instead: ``lorakit new-plugin gated --kind normalizer``
scaffolds one (entry point in the ``lorakit`` group, conformance tests included).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from dataclasses import dataclass

import torch

from lorakit.core import (
    Adapter,
    AdapterError,
    Normalizer,
    Slot,
    hookimpl,
    load,
    merge,
    register_plugin,
    registry,
    save,
    unmerge,
)


@dataclass
class Gated(Normalizer):
    gate: float = 1.0  # the initial g

    name = "gated"  # the registered name: what recipes and saved adapter_config.json files refer to

    def __post_init__(self):
        if not isinstance(self.gate, (int, float)) or self.gate == 0:
            raise AdapterError(f"gated: gate={self.gate!r} must be a non-zero number")

    def initial_scale(self, rank):  # the scale at init, which initializers such as PiSSA account for
        return float(torch.tanh(torch.tensor(self.gate)))

    def slots(self, weight, rank):  # one trainable scalar per adapted layer
        return {"gate": Slot(torch.tensor(float(self.gate)), trainable=True)}

    def factors(self, s, rank):  # effective (B', A') with ΔW = B'A'; ΔW itself is never built in training
        return s["B"] * (torch.tanh(s["gate"]) * s["d"]), s["A"]


class GatedPlugin:
    """The hooks an installed plugin's entry point would provide."""

    @staticmethod
    @hookimpl
    def lorakit_primitives(register):
        register(Gated)

    @staticmethod
    @hookimpl
    def lorakit_recipes(register):
        register("gated-dora", generator="direct", normalizer="gated", init="kaiming", magnitude="dora",
                 description="DoRA with a learned per-layer gate on the low-rank update")


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=10, help="AdamW steps per composition (default: 10)")
parser.add_argument("--rank", type=int, default=4, help="adapter rank (default: 4)")
args = parser.parse_args()  # --help prints the options and exits here, before anything runs
if args.steps < 1 or not 1 <= args.rank <= 32:
    parser.error("--steps must be >= 1 and --rank in [1, 32] (the layers are 32 x 64)")

if "gated" not in registry.load().plugins:
    register_plugin(GatedPlugin, name="gated")
    if "gated" in registry.failures:  # a plugin that fails registers nothing and is reported, not raised
        raise SystemExit(f"plugin failed: {registry.failures['gated']}")

compositions = {
    "recipe gated-dora": Adapter.from_recipe("gated-dora", rank=args.rank),
    "mlp + gated + pissa": Adapter(generator="mlp", normalizer={"name": "gated", "args": {"gate": 0.5}},
                                   init="pissa", rank=args.rank),
    "diagonal + gated + ldu": Adapter(generator="diagonal", normalizer="gated", init="ldu", rank=args.rank),
}
for label, adapter in compositions.items():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    x = torch.randn(16, 32)
    before = base(x).detach()
    model = adapter.apply(copy.deepcopy(base), targets=["0", "2"])
    assert torch.allclose(model(x), before, atol=1e-5), "every adapter starts as the identity"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(args.steps):
        loss = (model(x) - x.flip(0)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = model(x).detach()
    merge(model)  # folded into the base weights ...
    assert torch.allclose(model(x), trained, atol=1e-4)
    unmerge(model)  # ... and back out
    with tempfile.TemporaryDirectory() as folder:  # the saved config names "gated": load rebuilds it
        save(model, folder)
        assert torch.allclose(load(copy.deepcopy(base), folder)(x), trained, atol=1e-4)
    gates = [float(torch.tanh(p.detach())) for n, p in model.named_parameters() if n.endswith("gate")]
    print(f"{label:24s} loss {loss.item():.4f}  tanh(gate) per layer: {', '.join(f'{g:.3f}' for g in gates)}")
