"""Quantized bases from torchao: NF4 (``to_nf4``/``NF4Tensor``) and int8 weight-only
(``Int8Tensor``) weights inside a plain ``nn.Linear``, resolved by the weight's tensor type.

Every recipe on both: exact identity at init, only adapter slots train, the quantized
bytes never change, merge refused in place, ``merge_and_unload`` dequantized, save/load
(conformance kit); DoRA's ``W̄ Mᵀ`` against fp64 without the out × in matrix; requantize;
the registry's lookup by tensor type for any subclass; PEFT's loader on the export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from torchao.quantization import Int8Tensor, NF4Tensor  # noqa: E402

from lorakit.conformance import Combo, check_quantized_base  # noqa: E402
from lorakit.core import Adapter, AdapterError, MergeError, hookimpl, merge, merge_and_unload, registry  # noqa: E402
from lorakit.core.layer_kinds import LayerKind, LinearKind, plain_tensors  # noqa: E402
from lorakit.torchao import Int8WeightOnlyKind, NF4Kind, kinds, quantize  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
RECIPES = sorted(registry.load().recipes)
MODES = ["nf4", "int8"]


def quantizer(mode, **kw):
    # the kit's layers hold 64 and 32 blocks of 64 weights: scaler blocks of 32 divide both
    kw = {"scaler_block_size": 32, **kw} if mode == "nf4" else kw
    return lambda m: quantize(m, mode, skip=(), **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_conforms_on_a_torchao_base(mode, recipe):
    check_quantized_base(Combo(**registry.recipe(recipe).composition()), quantizer(mode))


@pytest.mark.parametrize("variant", [dict(mode="int8", group_size=16), dict(mode="nf4", block_size=32)], ids=str)
def test_variants(variant):
    mode = variant.pop("mode")
    for recipe in ("lora", "dora", "pissa"):
        check_quantized_base(Combo(**registry.recipe(recipe).composition()), quantizer(mode, **variant))


def test_the_kind_comes_from_the_weight_type_for_any_tensor_subclass():
    """The module is a plain nn.Linear either way: its weight's type decides."""
    model = quantize(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)), "nf4",
                     scaler_block_size=16, skip=("1", "2"))
    quantize(model[1:2], "int8", skip=())
    assert isinstance(quantize(model, "int8", skip=("2",))[0].weight, NF4Tensor)  # a quantized weight stays as is
    assert [type(m) for m in model] == [nn.Linear] * 3
    assert isinstance(model[0].weight, NF4Tensor) and isinstance(model[1].weight, Int8Tensor)
    assert [type(registry.layer_kind(m)) for m in model] == [NF4Kind, Int8WeightOnlyKind, LinearKind]
    Adapter(rank=2).apply(model, targets=["0", "1", "2"])
    # an adapted layer exposes its base's weight as a property: it is not itself adaptable
    assert registry.layer_kind(model[0]) is None

    class Tagged(torch.Tensor):  # a third party's subclass, registered through the hook
        pass

    class TaggedKind(LinearKind):
        pass

    class Plugin:
        @staticmethod
        @hookimpl
        def lorakit_layers(register):
            register(Tagged, TaggedKind())

    registry.register_plugin(Plugin, "tagged-weights")
    try:
        linear = nn.Linear(4, 4)
        assert type(registry.layer_kind(linear)) is LinearKind
        linear.weight = nn.Parameter(linear.weight.detach().as_subclass(Tagged))
        assert type(registry.layer_kind(linear)) is TaggedKind
    finally:
        registry.unregister("tagged-weights")


def test_plain_tensors_open_a_subclass_into_its_bytes():
    w = quantize(nn.Sequential(nn.Linear(64, 64)), "nf4", scaler_block_size=16, skip=())[0].weight
    inner = plain_tensors(w)
    assert set(inner) == {"quantized_data", "scaler_mean", "quantization_factor", "quantized_scalers", "nf4"}
    assert inner["quantized_data"].dtype == torch.uint8 and inner["quantized_data"].numel() == 64 * 64 // 2
    plain = torch.ones(3)
    assert plain_tensors(plain) == {"": plain}


@pytest.mark.parametrize("mode", MODES + ["int8-group", "int8-tensor"])
def test_weight_times_t_against_fp64_in_row_blocks_and_training_never_dequantizes(mode, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 40))
    if mode == "int8-tensor":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerTensor

        quantize_(model, Int8WeightOnlyConfig(granularity=PerTensor(), set_inductor_config=False))
    else:
        quantize(model, mode.partition("-")[0], scaler_block_size=4, group_size=32 if "group" in mode else None,
                 skip=())
    Adapter.from_recipe("dora", rank=4).apply(model, targets=["0"])
    layer = model[0]
    M = torch.randn(5, 96)
    dense = layer.kind.matrix(layer.base)
    exact = (dense.double() @ M.double().T)
    for elements in (1 << 22, 96 * 3, 1):  # one block, several, one row (NF4: whole 64-blocks) at a time
        monkeypatch.setattr(kinds, "BLOCK_ELEMENTS", elements)
        got = layer.kind.weight_times_t(layer.base, M)
        assert got.shape == (40, 5) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6)
    rows = type(layer.kind).rows(layer.base.weight, 0, 40)
    assert torch.equal(rows, dense), "the row-block dequantization differs from torchao's"

    calls = []
    monkeypatch.setattr(type(layer.kind), "matrix", lambda self, base: calls.append(1) or 1 / 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 96)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model(x)
    assert not calls, "a training step dequantized the out x in weight"


@pytest.mark.parametrize("mode", MODES)
def test_merge_refused_in_place_requantize_reports_and_unload_is_float(mode):
    def adapted():  # built twice: copy.deepcopy of an NF4Tensor requantizes it (torchao's clone)
        torch.manual_seed(0)
        model = quantize(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)), mode,
                         scaler_block_size=16, skip=())
        Adapter.from_recipe("dora", rank=4).apply(model, targets=["0", "2"])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        return model

    model = adapted()
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = model(x)
    with pytest.raises(MergeError, match="requantize=True"):
        merge(model)
    requant = merge_and_unload(adapted(), requantize=True)
    weight_type = NF4Tensor if mode == "nf4" else Int8Tensor
    assert type(requant[0]) is nn.Linear and isinstance(requant[0].weight, weight_type)
    if mode == "nf4":  # the same format: block sizes kept
        assert (requant[0].weight.block_size, requant[0].weight.scaler_block_size) == (64, 16)
    report = requant.lorakit_merge_report["0"]
    assert set(report) == {"max_abs_error", "rel_fro_error"} and 0 < report["rel_fro_error"] < 0.2
    with pytest.warns(UserWarning, match="no longer quantized"):
        merged = merge_and_unload(model)
    assert type(merged[0]) is nn.Linear and type(merged[0].weight) is nn.Parameter
    assert merged[0].weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_requantize_failing_part_way_puts_the_quantized_weights_back(monkeypatch):
    torch.manual_seed(0)
    model = quantize(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)), "nf4", scaler_block_size=16,
                     skip=())
    Adapter.from_recipe("lora", rank=4).apply(model, targets=["0", "2"])
    weights = [model[0].base.weight, model[2].base.weight]
    calls = []
    original = NF4Kind.quantize_like

    def fail_second(self, weight, W):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated")
        return original(self, weight, W)

    monkeypatch.setattr(NF4Kind, "quantize_like", fail_second)
    with pytest.raises(MemoryError):
        merge_and_unload(model, requantize=True)
    assert model[0].base.weight is weights[0] and model[2].base.weight is weights[1]


def test_bad_input_is_one_clear_error_and_changes_nothing():
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(64, 32))  # the first fits, the second does not
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"'1' has 2048 weights, not a multiple of block_size x scaler_block_size"):
        quantize(model, "nf4", skip=())  # torchao's defaults: 16384-weight scaler blocks
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(AdapterError, match="quantize mode 'int4'"):
        quantize(model, "int4")

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    dynamic = nn.Sequential(nn.Linear(64, 64))
    quantize_(dynamic, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    with pytest.raises(AdapterError, match="quantize with Int8WeightOnlyConfig"):
        Adapter(rank=2).apply(dynamic, targets=["0"])
    assert type(dynamic[0]) is nn.Linear

    class Scaled(nn.Linear):  # its own forward: W̄ x is not its output
        def forward(self, x):
            return 2 * super().forward(x)

    odd = quantize(nn.Sequential(nn.Linear(64, 64)), "nf4", scaler_block_size=16, skip=())
    odd[0].__class__ = Scaled
    with pytest.raises(AdapterError, match="lorakit-torchao adapts torchao weights inside a plain nn.Linear"):
        Adapter(rank=2).apply(odd, targets=["0"])


def test_layer_kind_contract_defaults():
    assert NF4Kind.quantized and Int8WeightOnlyKind.quantized and issubclass(NF4Kind, LayerKind)


# -- PEFT: the export loads on the same torchao base -------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("recipe", ["lora", "dora"])
def test_peft_loads_the_export_on_the_same_torchao_base(tmp_path, mode, recipe):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.transformers import export_peft

    def base():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=32))
        return quantize(model, mode, scaler_block_size=16 if mode == "nf4" else 256).eval()

    model = base()
    Adapter.from_recipe(recipe, rank=4).apply(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids).logits.square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    export_peft(model, tmp_path / "peft")
    if recipe == "dora" and mode == "nf4":  # PEFT's DoRA calls weight.dequantize(), an NF4Tensor static method
        with pytest.raises(TypeError, match="dequantize"):
            PeftModel.from_pretrained(base(), tmp_path / "peft")
        return
    peft_model = PeftModel.from_pretrained(base(), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_the_plugin_registers_by_name_without_importing_torchao():
    """Loading the plugins (every lorakit command, the first Adapter) must not import torchao
    (~2 s, warnings); the names it registers are the real types' qualified names."""
    import subprocess
    import sys

    from lorakit.torchao import plugin

    code = ("import sys; from lorakit.core import registry; registry.load(); "
            "assert 'torchao' in registry.plugins, registry.failures; print('torchao' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
    for name, cls in ((plugin.NF4_TENSOR, NF4Tensor), (plugin.INT8_TENSOR, Int8Tensor)):
        assert f"{cls.__module__}.{cls.__qualname__}" == name
