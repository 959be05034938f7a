"""What a primitive returns is checked at apply: shape, arity, dtype, finiteness.

A plugin's initializer that returns NaN would silently break identity at init; a
wrong shape would surface as a raw torch error at the first forward. Each case is
one ``AdapterError`` at ``apply`` naming the module, the primitive and its plugin,
with the model unchanged.
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lorakit.core import Adapter, AdapterError, Generator, Initializer, Magnitude, Normalizer, hookimpl
from lorakit.core.plugins import registry
from lorakit.core.primitives import ParameterSlots


@dataclass
class BadInit(Initializer):
    defect: str = "nan"
    name = "bad-init"

    def factors(self, weight, rank, scale, rng):
        out_f, in_f = weight.shape
        B, d, A = torch.zeros(out_f, rank), torch.ones(rank), torch.randn(rank, in_f, generator=rng)
        if self.defect == "nan":
            B[0, 0] = float("nan")
        elif self.defect == "shape":
            A = torch.randn(rank + 1, in_f)
        elif self.defect == "arity":
            return B, A
        elif self.defect == "int":
            d = torch.ones(rank, dtype=torch.int64)
        return B, d, A


@dataclass
class DropsSlot(Generator):
    name = "drops-slot"

    def build(self, slots, rng):
        return ParameterSlots({n: s for n, s in slots.items() if n != "d"})


@dataclass
class DictSlots(Generator):
    name = "dict-slots"

    def build(self, slots, rng):
        return {n: s.value for n, s in slots.items()}  # the values, not a SlotsModule


@dataclass
class WrongFactors(Normalizer):
    name = "wrong-factors"

    def factors(self, s, rank):
        return s["B"], s["A"].T  # transposed: a shape error the first forward would hit


@dataclass
class InfScale(Magnitude):
    name = "inf-scale"

    def row_scale(self, s, weight, row_sq_norm, B, A):
        return torch.full((weight.shape[0],), float("inf"))


class BadPrimitives:
    @hookimpl
    def lorakit_primitives(register):
        for cls in (BadInit, DropsSlot, DictSlots, WrongFactors, InfScale):
            register(cls)


@pytest.fixture(autouse=True)
def bad_plugin():
    registry.load().register_plugin(BadPrimitives, "bad-primitives")
    yield
    registry.unregister("bad-primitives")


CASES = {
    "init-nan": (dict(init=BadInit("nan")), "initializer 'bad-init' (plugin 'bad-primitives') returned non-finite"),
    "init-shape": (dict(init=BadInit("shape")), "returned A0 of shape (3, 6), expected (2, 6)"),
    "init-arity": (dict(init=BadInit("arity")), "returned tuple for factors(); expected a tuple of 3 tensors"),
    "init-int": (dict(init=BadInit("int")), "returned a torch.int64 tensor for d0"),
    "generator-drops-slot": (dict(generator=DropsSlot()), "generator 'drops-slot' (plugin 'bad-primitives') "
                                                          "does not return the slots ['d']"),
    "generator-dict": (dict(generator=DictSlots()), "generator 'dict-slots' (plugin 'bad-primitives') returned "
                                                   "dict from build(), not a SlotsModule"),
    "normalizer-shape": (dict(normalizer=WrongFactors()), "normalizer 'wrong-factors' (plugin 'bad-primitives') "
                                                          "returned A' of shape (6, 2), expected (2, 6)"),
    "magnitude-inf": (dict(magnitude=InfScale()), "magnitude 'inf-scale' (plugin 'bad-primitives') returned "
                                                  "non-finite values (NaN/inf) in row_scale()"),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_primitive_output_is_one_clear_error(case):
    overrides, message = CASES[case]
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 5))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError) as err:
        Adapter(rank=2, **overrides).apply(model, targets=["0", "2"])
    text = str(err.value)
    assert message in text and "module '0'" in text and "\n" not in text, text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model[0], nn.Linear)


def test_every_primitive_case_is_in_the_docs_table():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "bad-inputs.md").read_text()
    for case, (_, message) in CASES.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| output `{case}` |")), None)
        assert row is not None and message in row, f"docs/bad-inputs.md lacks the row of {case!r}"
