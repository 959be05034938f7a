"""The diffusers and kohya formats hold LoRA factors only: an adapter that also trained
base biases (``bias=``) or whole modules (``modules_to_save``) is refused with one
error naming the option, instead of an export that silently drops them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.core import Adapter, AdapterError
from lorakit.diffusers import export_diffusers
from lorakit.diffusers.kohya import kohya_tensors


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize(("options", "needle"), [
    ({"bias": "all"}, r"bias='all' \(trained biases\)"),
    ({"bias": "adapted"}, r"bias='adapted'"),
    ({"modules_to_save": ["2"]}, r"modules_to_save \(trained modules \['2'\]\)")])
def test_diffusers_and_kohya_refuse_what_they_cannot_hold(tmp_path, options, needle):
    model = Adapter(rank=2, **options).apply(net(), targets=["0"])
    with pytest.raises(AdapterError, match=f"diffusers format cannot hold {needle}"):
        export_diffusers(model, tmp_path / "d")
    with pytest.raises(AdapterError, match=f"kohya format cannot hold {needle}"):
        kohya_tensors(model, "lora_unet")
    assert not (tmp_path / "d").exists()


def test_plain_adapter_still_exports(tmp_path):
    model = Adapter(rank=2).apply(net(), targets=["0", "2"])
    tensors, _ = kohya_tensors(model, "lora_unet")
    assert "lora_unet_0.lora_down.weight" in tensors
    with pytest.warns(UserWarning, match="no LoRA loader"):
        export_diffusers(model, tmp_path / "d")
