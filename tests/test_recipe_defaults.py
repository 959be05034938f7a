"""A recipe's default may change; a checkpoint saved under the old one must load as it was.

``tests/data/old-recipe-checkpoints`` was written by lorakit before the papers' second
round: recipe ``delora`` (λ0 = 15 then) and ``op-lora`` (the paper's unscaled head,
``gain=None``), each trained 5 Adam steps on a small MLP, with the adapted model's output
on fixed inputs. The config records every primitive argument, the recipe name is a label,
so loading rebuilds the old adapter whatever the recipe's default is now.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit.core as core
from lorakit.core import Adapter, checkpoint

DATA = Path(__file__).parent / "data" / "old-recipe-checkpoints"
#: the value each checkpoint records, and where in its adapter config
OLD = {"delora": ("normalizer", "lambda0", 15.0), "op-lora": ("generator", "gain", None)}
#: the recipes' defaults now
CURRENT = {"delora": 15.0, "op-lora": None}


def _base():
    tensors = load_file(str(DATA / "base.safetensors"))
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
    base.load_state_dict({k.removeprefix("base."): v for k, v in tensors.items() if k.startswith("base.")})
    return base, tensors["x"]


@pytest.mark.parametrize("recipe", sorted(OLD))
def test_old_checkpoint_loads_bit_identically(recipe):
    part, arg, old = OLD[recipe]
    config = json.loads((DATA / recipe / "adapter_config.json").read_text())["adapter"]
    assert config["recipe"] == recipe and config[part]["args"][arg] == old  # the old value is recorded
    base, x = _base()
    model = copy.deepcopy(base)
    checkpoint.load(model, DATA / recipe)
    with torch.no_grad():
        y = model(x)
    assert torch.equal(y, load_file(str(DATA / recipe / "expected_output.safetensors"))["y"])
    assert core.adapter_config(model)[part]["args"][arg] == old  # rebuilt with the recorded value


def test_a_checkpoint_records_the_recipes_current_default():
    """Saved today, a recipe's checkpoint records its current value explicitly too, so a
    later change of the default leaves it loading as saved."""
    base, _ = _base()
    for recipe, (part, arg, _) in OLD.items():
        model = Adapter.from_recipe(recipe, rank=2).apply(copy.deepcopy(base), targets=["0", "2"])
        assert core.adapter_config(model)[part]["args"][arg] == CURRENT[recipe]
