"""lorakit.core.peft_format on plain torch models: Linear and Conv2d targets, any recipe,
loaded by PEFT's own injection (no transformers model needed)."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

from lorakit.conformance import perturb
from lorakit.core import Adapter, registry
from lorakit.core.peft_format import lora_config, lora_tensors


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.proj = nn.Linear(8, 5)

    def forward(self, x):
        return self.proj(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


def net():
    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize("recipe", sorted(registry.load().recipes))
def test_peft_loads_conv_and_linear_exports(recipe):
    x = torch.randn(2, 3, 6, 6)
    model = Adapter.from_recipe(recipe, rank=2).apply(net(), targets=["conv", "proj"])
    perturb(model, 0)
    expected = model(x)
    tensors, ranks, use_dora, errors = lora_tensors(model)
    assert max(errors.values()) < 1e-6
    assert tensors["conv.lora_A.weight"].shape[1:] == (3, 3, 3)  # a conv with the base kernel
    assert tensors["conv.lora_B.weight"].shape[2:] == (1, 1)
    config = {k: v for k, v in lora_config(ranks, use_dora=use_dora).items()
              if k not in ("peft_type", "inference_mode")}
    client = inject_adapter_in_model(LoraConfig(**config), net())
    result = set_peft_model_state_dict(client, tensors)
    assert not result.unexpected_keys
    torch.testing.assert_close(client(x), expected, rtol=1e-5, atol=1e-5)


def test_dilated_conv_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    Adapter(rank=2).apply(model, targets=["0"])
    with pytest.raises(ValueError, match="module '0': a Conv2d with dilation"):
        lora_tensors(model)


def test_exporters_ask_the_layer_kind_what_it_can_be_written_as():
    """A layer kind declares its export layouts (``LayerKind.exports``); PEFT, diffusers
    and kohya exporters refuse a module whose kind does not list theirs, naming it."""
    import pytest
    from torch import nn

    from lorakit.core import Adapter, AdapterError, adapted_layers
    from lorakit.core.peft_format import check_exportable

    model = nn.Sequential(nn.Linear(6, 4))
    Adapter(rank=2).apply(model, targets=["0"])
    check_exportable(model, "diffusers", "diffusers")  # nn.Linear: peft, diffusers, kohya
    layer = adapted_layers(model)["0"]
    layer.kind = type("PeftOnly", (type(layer.kind),), {"exports": frozenset({"peft"})})()
    with pytest.raises(AdapterError, match="module '0' is a Linear, which the kohya format cannot hold"):
        check_exportable(model, "kohya", "kohya")
    check_exportable(model, "peft", "PEFT")
