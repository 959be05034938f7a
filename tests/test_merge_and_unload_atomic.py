"""``merge_and_unload`` is all or nothing: an exception at any layer (``MemoryError``
injected at the 2nd quantized layer, at requantizing it, at a float layer's merge)
leaves the model as it was — every layer still adapted, quantized storage and float
weights bit-identical, the same output — and a retry then succeeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from lorakit.bitsandbytes import quantize  # noqa: E402
from lorakit.core import Adapter, adapted_layers, merge_and_unload  # noqa: E402
from lorakit.core.layer import AdaptedLayer  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
NAMES = ["0", "2", "4", "head", "tail"]


def _model(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16))
    model.add_module("head", nn.Linear(16, 8))
    model.add_module("tail", nn.Linear(8, 8))
    quantize(model, mode, skip=("head", "tail"))
    Adapter.from_recipe("dora", rank=4).apply(model, targets=NAMES)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _state(model):
    """Every tensor the model holds, quantized storage and its statistics included."""
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for name, layer in adapted_layers(model).items():
        w = layer.base.weight
        out[f"{name}.data"] = w.data.clone()
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            out[f"{name}.absmax"] = qs.absmax.clone()
        for key in ("CB", "SCB"):
            if getattr(getattr(layer.base, "state", None), key, None) is not None:
                out[f"{name}.state.{key}"] = getattr(layer.base.state, key).clone()
    return out


def _fail_at_second(monkeypatch, cls, method):
    calls, real = [], getattr(cls, method)

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("injected at the 2nd layer")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, failing)
    return calls


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("where", ["float_module", "requantize", "merge"])
def test_a_failure_at_the_second_layer_leaves_the_model_as_it_was(mode, where, monkeypatch):
    model = _model(mode)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = model(x)
    before = _state(model)
    kind = type(model[0].kind)
    cls, method = (AdaptedLayer, "merge") if where == "merge" else (kind, where)
    calls = _fail_at_second(monkeypatch, cls, method)
    with pytest.raises(MemoryError, match="2nd layer"):
        merge_and_unload(model, requantize=where == "requantize")
    assert len(calls) == 2
    assert all(isinstance(getattr(model, n), AdaptedLayer) and not getattr(model, n).merged for n in NAMES)
    assert not hasattr(model, "lorakit_merge_report")
    after = _state(model)
    assert after.keys() == before.keys()
    exact = where != "merge"  # an unmerged float weight is W_eff / g − B A: within rounding (docs/design.md)
    for key, value in before.items():
        if exact or not key.startswith(("head", "tail")):
            assert torch.equal(after[key], value), key
        else:
            torch.testing.assert_close(after[key], value, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, y) if exact else torch.allclose(out, y, rtol=1e-5, atol=1e-6)

    monkeypatch.undo()
    merged = merge_and_unload(model, requantize=where == "requantize")
    assert not adapted_layers(merged)
    if where != "requantize":
        with torch.no_grad():
            torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_the_class_is_in_the_docs_table():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "bad-inputs.md").read_text()
    assert "test_merge_and_unload_atomic.py::test_a_failure_at_the_second_layer_leaves_the_model_as_it_was" in doc
