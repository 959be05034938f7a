"""Quantized bases: bitsandbytes Linear4bit (nf4/fp4) and Linear8bitLt on CPU.

Every recipe on nf4 and int8: exact identity at init, only adapter slots train, the
quantized base never changes a byte, merge semantics, save/load (conformance kit),
and the PEFT export loads with ``PeftModel.from_pretrained`` on the same quantized
base with outputs equal to lorakit's (1e-5, fp32 compute)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from lorakit.bitsandbytes import frozen_base_bytes, prepare_for_kbit_training, quantize  # noqa: E402
from lorakit.conformance import Combo, check_quantized_base, combinations  # noqa: E402
from lorakit.core import Adapter, AdapterError, MergeError, merge, merge_and_unload, registry  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
RECIPES = sorted(registry.load().recipes)
MODES = ["nf4", "int8"]


def quantizer(mode, **kw):
    return lambda m: quantize(m, mode, skip=(), **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_conforms_on_a_quantized_base(mode, recipe):
    check_quantized_base(Combo(**registry.recipe(recipe).composition()), quantizer(mode))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_every_combination_conforms_on_a_quantized_base(mode):
    failures = []
    for combo in combinations():
        try:
            check_quantized_base(combo, quantizer(mode))
        except AssertionError as exc:
            failures.append(str(exc)[:200])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", [dict(mode="fp4"), dict(mode="nf4", double_quant=True),
                                     dict(mode="nf4", compute_dtype=torch.bfloat16)], ids=str)
def test_linear4bit_variants(variant):
    mode = variant.pop("mode")
    exact = variant.get("compute_dtype", torch.float32) == torch.float32
    for recipe in ("lora", "dora", "pissa"):
        check_quantized_base(Combo(**registry.recipe(recipe).composition()), quantizer(mode, **variant),
                             exact_identity=exact or registry.recipe(recipe).composition()["magnitude"] is None)


@pytest.mark.parametrize("mode", MODES)
def test_weight_times_t_is_the_dense_product_and_training_never_dequantizes(mode, monkeypatch):
    torch.manual_seed(0)
    model = quantize(nn.Sequential(nn.Linear(64, 32)), mode, skip=())
    Adapter.from_recipe("dora", rank=4).apply(model, targets=["0"])
    layer = model[0]
    M = torch.randn(5, 64)
    dense = layer.kind.matrix(layer.base) @ M.T
    torch.testing.assert_close(layer.kind.weight_times_t(layer.base, M), dense, rtol=1e-5, atol=1e-5)

    calls = []
    monkeypatch.setattr(type(layer.kind), "matrix", lambda self, base: calls.append(1) or 1 / 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 64)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model(x)
    assert not calls, "a training step dequantized the out x in weight"


def test_merge_refused_in_place_requantize_reports_and_unload_is_float():
    torch.manual_seed(0)
    model = quantize(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16)), "nf4", skip=())
    Adapter.from_recipe("lora", rank=4).apply(model, targets=["0", "2"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = model(x)
    with pytest.raises(MergeError, match="requantize=True"):
        merge(model)
    requant = merge_and_unload(copy.deepcopy(model), requantize=True)
    assert isinstance(requant[0], bnb.nn.Linear4bit)
    assert set(requant.lorakit_merge_report["0"]) == {"max_abs_error", "rel_fro_error"}
    assert 0 < requant.lorakit_merge_report["0"]["rel_fro_error"] < 0.2
    with pytest.warns(UserWarning, match="no longer quantized"):
        merged = merge_and_unload(model)
    assert type(merged[0]) is nn.Linear and merged[0].weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_errors_name_the_package_and_the_supported_layers(monkeypatch):
    torch.manual_seed(0)
    model = quantize(nn.Sequential(nn.Linear(64, 32)), "nf4", skip=())
    layers = dict(registry.load().layers)
    monkeypatch.setattr(registry, "layers", {t: k for t, k in layers.items() if not getattr(k, "quantized", False)})
    with pytest.raises(AdapterError, match="pip install lorakit-bitsandbytes"):
        Adapter(rank=2).apply(model, targets=["0"])
    monkeypatch.setattr(registry, "layers", layers)

    Unsupported = type("Linear2bit", (nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    odd = nn.Sequential(Unsupported(8, 8))
    odd[0].weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(AdapterError, match="supported quantized layers: Linear4bit, Linear8bitLt"):
        Adapter(rank=2).apply(odd, targets=["0"])

    raw = nn.Sequential(bnb.nn.Linear4bit(8, 8))  # never moved to a device: not quantized yet
    with pytest.raises(AdapterError, match="not quantized yet"):
        Adapter(rank=2).apply(raw, targets=["0"])


# -- PEFT: the export loads on the same quantized base -------------------------------------------

def tiny_llama(mode):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    return quantize(model, mode).eval()


def peft_roundtrip(tmp_path, mode, recipe):
    from peft import PeftModel

    from lorakit.transformers import export_peft

    model = tiny_llama(mode)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    Adapter.from_recipe(recipe, rank=4).apply(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(3):
        (model(input_ids=ids).logits - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    after = {k.replace(".base.", ".", 1): v for k, v in model.state_dict().items() if ".base." in k}
    assert all(torch.equal(frozen[k], v) for k, v in after.items()), "training changed the quantized base"
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # training mode: int8 eval would also quantize activations
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(mode), str(tmp_path / "peft"))
    assert any("bnb" in type(m).__module__ for m in peft_model.modules()), "PEFT did not wrap bitsandbytes layers"
    for m in peft_model.modules():  # same kernels as lorakit: bnb's CPU bf16 repack path off
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    peft_model.train()  # no dropout in either; the training-mode forward, as above
    with torch.no_grad():
        out = peft_model(input_ids=ids).logits
    assert (out - ref).abs().max() <= 1e-5


PEFT_FAST = ["lora", "dora", "pissa"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("recipe", PEFT_FAST)
def test_peft_loads_the_export_on_the_same_quantized_base(tmp_path, mode, recipe):
    peft_roundtrip(tmp_path, mode, recipe)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in PEFT_FAST])
def test_peft_loads_every_recipe_on_the_same_quantized_base(tmp_path, mode, recipe):
    peft_roundtrip(tmp_path, mode, recipe)


# -- training ------------------------------------------------------------------------------------

def test_trainer_with_a_4bit_base_and_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    from lorakit.transformers import LorakitCallback

    model = tiny_llama("nf4")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    prepare_for_kbit_training(model)
    Adapter.from_recipe("dora", rank=4).apply(model)
    assert frozen_base_bytes(model) < fp32_bytes
    before = {k: v.clone() for k, v in model.state_dict().items() if "slots" in k}
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 8), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=5e-2, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[LorakitCallback()]).train()
    assert model.is_gradient_checkpointing
    moved = [k for k, v in model.state_dict().items() if "slots" in k and not torch.equal(v, before[k])]
    assert moved, "no adapter parameter trained"
    after = {k.replace(".base.", ".", 1): v for k, v in model.state_dict().items() if ".base." in k}
    assert all(torch.equal(frozen[k], v) for k, v in after.items())


@pytest.mark.slow
def test_bench_quantize_runs_lorakit_and_peft_on_the_same_nf4_base():
    from lorakit.bench import BenchConfig, run_bench

    config = BenchConfig(hidden=64, layers=1, intermediate=128, vocab=64, batch=1, seq=8, steps=1, repeats=1,
                         warmup=0, recipes=("lora", "dora"), peft=("lora", "dora"), floor=False, quantize="nf4")
    result = run_bench(config)
    assert result["config"]["quantize"] == "nf4"
    for label, row in result["methods"].items():
        assert row["init_loss_minus_base"] == 0, label  # identity at init on the quantized base, both libraries
    assert "memory: lorakit dora / PEFT LoRA" in result["ratios"]


def test_bench_quantize_int8_shares_one_base_between_methods():
    """An 8-bit base's first forward moves its int8 weight and scales off the shared weight;
    the bench puts them back, so every method after it (PEFT's LoRA, which moves the module)
    still finds them: identity at init for every method, the quantized layers fused."""
    from lorakit.bench import BenchConfig, run_bench

    config = BenchConfig(hidden=64, layers=1, intermediate=128, vocab=64, batch=1, seq=8, steps=1, repeats=1,
                         warmup=0, recipes=("lora", "dora"), peft=("lora",), floor=False, quantize="int8",
                         lifecycle=False)
    result = run_bench(config)
    assert list(result["methods"]) == ["lorakit lora", "lorakit dora", "PEFT LoRA"]
    for label, row in result["methods"].items():
        assert row["init_loss_minus_base"] == 0, label


def test_ddp_trains_on_a_quantized_base_and_fsdp2_is_refused_clearly(tmp_path):
    """One gloo rank (file store): DDP replicates the frozen quantized base and reduces
    only the adapter's gradients; FSDP2's fully_shard would replace the quantized weight
    by a DTensor, which the kinds refuse with a clear error instead of bitsandbytes'
    AttributeError."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for mode in MODES:
            torch.manual_seed(0)
            model = quantize(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32)), mode, skip=())
            frozen = {k: v.clone() for k, v in model.state_dict().items()}
            Adapter.from_recipe("dora", rank=4).apply(model, targets=["0", "2"])
            ddp = DistributedDataParallel(model)
            opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
            ddp(torch.randn(4, 64)).square().mean().backward()
            opt.step()
            after = {k.replace(".base.", ".", 1): v for k, v in model.state_dict().items() if ".base." in k}
            assert all(torch.equal(frozen[k], v) for k, v in after.items())

            fully_shard(model[0])
            with pytest.raises(RuntimeError, match="FSDP2 .* not supported by lorakit-bitsandbytes"):
                model(torch.randn(4, 64))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", MODES)
def test_a_model_loaded_with_bitsandbytesconfig(tmp_path, mode):
    """What users do: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``.
    lorakit adapts the loaded bitsandbytes layers (default targets), is the quantized model
    exactly at step 0, trains without touching the base, and exports a PEFT adapter."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from lorakit.core import adapted_layers
    from lorakit.transformers import export_peft

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "base")
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
              if mode == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu").train()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    Adapter.from_recipe("dora", rank=4).apply(model)
    layers = adapted_layers(model)
    assert layers and all("bitsandbytes" in type(layer.base).__module__ for layer in layers.values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids).logits.square().mean().backward()
    opt.step()
    after = {k.replace(".base.", ".", 1): v for k, v in model.state_dict().items() if ".base." in k}
    assert after and all(torch.equal(frozen[k], v) for k, v in after.items())
    export_peft(model, tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_a_tensor_subclass_weight_is_one_clear_error():
    """torchao's weight-only types keep ``nn.Linear`` and put the quantization in a tensor
    subclass; without a layer kind for it, apply says so in one line (it used to raise
    torchao's own NotImplementedError from inside the initializer)."""

    class Wrapped(torch.Tensor):  # the smallest __torch_dispatch__ subclass
        @staticmethod
        def __new__(cls, data):
            return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype)

        def __init__(self, data):
            self.data_ = data

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.detach.default:
                return args[0]
            raise NotImplementedError(f"{func} on Wrapped")

    model = nn.Sequential(nn.Linear(6, 4))
    model[0].weight = nn.Parameter(Wrapped(torch.randn(4, 6)), requires_grad=False)
    with pytest.raises(AdapterError, match="holds its weight as a Wrapped .a tensor subclass"):
        Adapter(rank=2).apply(model, targets=["0"])
    assert isinstance(model[0], nn.Linear)
