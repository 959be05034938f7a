"""LoRA-FA through lorakit's conformance kit, and the kit catching a broken LoRA-FA."""

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from lorakit_lorafa import LoRAFA
from torch import nn

from lorakit.conformance import cases, check_combination, check_slot_contract, combinations
from lorakit.core import Adapter, Generator, ParameterSlots, Slot, adapted_layers, registry

EXAMPLES = int(os.environ.get("LORAKIT_CONFORMANCE_EXAMPLES", "3"))


def test_registered_through_the_entry_point():
    assert registry.primitive_class("generator", "lora-fa") is LoRAFA
    assert registry.recipe("lora-fa").generator == {"name": "lora-fa", "args": {}}


def test_only_b_trains():
    model = nn.Sequential(nn.Linear(6, 5))
    Adapter.from_recipe("lora-fa", rank=2).apply(model, targets=["0"])
    layer = adapted_layers(model)["0"]
    assert {n for n, p in layer.slots.named_parameters()} == {"B"}
    assert "A" in dict(layer.slots.named_buffers())


@pytest.mark.parametrize("combo", combinations(include=[LoRAFA()]), ids=str)
@given(case=cases(max_dim=16))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_lorafa_conforms(combo, case):
    check_combination(combo, case)


@dataclass
class BrokenLoRAFA(Generator):
    """Declares A frozen, then trains it anyway: the bug the kit must catch."""

    name = "broken-lora-fa"
    trainable_factors = {"A": False, "B": True, "d": False}

    def build(self, slots, rng):
        return ParameterSlots({n: Slot(s.value, s.trainable or n == "A", s.role) for n, s in slots.items()})


@dataclass
class SneakyLoRAFA(Generator):
    """Declares A frozen and says so when built, but stores it as a parameter."""

    name = "sneaky-lora-fa"
    trainable_factors = {"A": False, "B": True, "d": False}

    def build(self, slots, rng):
        module = ParameterSlots(slots)
        A = module._buffers.pop("A")
        module.A = nn.Parameter(A)
        return module


@pytest.mark.parametrize("generator,message", [
    (BrokenLoRAFA(), "slot A is not the factor A its generator declares"),
    (SneakyLoRAFA(), "frozen slot 'A' is computed from trained parameters"),
], ids=["declares-A-trainable", "stores-A-as-a-parameter"])
def test_the_kit_catches_a_lora_fa_that_trains_a(generator, message):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    adapter = Adapter(generator=generator, rank=2)
    adapter.apply(model, targets=["0", "2"])
    with pytest.raises(AssertionError, match=message):
        check_slot_contract(generator.name, adapter, model, torch.randn(3, 6))
