"""Mixed precision: every registered composition trains and evaluates under ``torch.autocast``
(bf16 and fp16; CPU here, CUDA by the same code), eager and compiled, on Linear, Conv,
Embedding and the bitsandbytes kinds (``lorakit.conformance.check_autocast``).

Semantics (PEFT's): the base GEMM and the low-rank term run in the autocast dtype, the output
has the dtype the base module gives under autocast, the adapter's parameters stay fp32 masters
with fp32 gradients, DoRA's row norms and merge stay fp32. Outputs within 4·eps of the autocast
dtype of fp64, elementwise relative to the magnitude of the summed terms.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from lorakit.conformance import (
    AUTOCAST_DTYPES,
    QUANTIZED_CASE,
    Case,
    Combo,
    build_model,
    cases,
    check_autocast,
    combinations,
    perturb,
)
from lorakit.conformance.kit import _loss
from lorakit.core import Adapter, adapted_layers, registry

DTYPES = {str(d).removeprefix("torch."): d for d in AUTOCAST_DTYPES}
RECIPES = {name: Combo(**r.composition()) for name, r in sorted(registry.load().recipes.items())}

# fixed cases (deterministic): a linear pair with dropout and trained biases, a conv2d pair, an embedding
CASES = [Case("linear", 24, 32, 16, 4, torch.float32, 3, seed=1, dropout=0.25, bias="adapted"),
         Case("conv2d", 3, 6, 5, 2, torch.float32, 2, seed=2),
         Case("embedding", 20, 12, 8, 3, torch.float32, 2, seed=3)]


@pytest.mark.parametrize("combo", combinations(), ids=str)
def test_every_composition_under_autocast(combo):
    """bf16 on every case, fp16 on the linear one (the other fp16 cases: slow, below)."""
    for case in CASES:
        check_autocast(combo, case, torch.bfloat16)
    check_autocast(combo, CASES[0], torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("combo", combinations(), ids=str)
def test_every_composition_under_fp16_autocast(combo):
    for case in CASES[1:]:
        check_autocast(combo, case, torch.float16)


@pytest.mark.parametrize(("recipe", "dtype"), [("lora", torch.bfloat16), ("dora", torch.bfloat16),
                                               ("op-lora", torch.bfloat16), ("delora", torch.bfloat16),
                                               ("lora", torch.float16)], ids=str)
def test_compiled_under_autocast(recipe, dtype):
    """The recipes the issue names, compiled (aot_eager: the traced ops, no code generation);
    every recipe, fp16 and inductor: slow, below."""
    check_autocast(RECIPES[recipe], CASES[0], dtype, compile_backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("combo", combinations(), ids=str)
@given(case=cases(max_dim=32, dtypes=(torch.float32,)))
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_every_composition_under_autocast_drawn_cases(combo, case):
    for dtype in AUTOCAST_DTYPES:
        check_autocast(combo, case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_compiled_under_autocast(recipe, backend):
    for dtype in AUTOCAST_DTYPES:
        check_autocast(RECIPES[recipe], CASES[0], dtype, compile_backend=backend)


@pytest.mark.parametrize("recipe", ["lora", "dora", "op-lora", "delora"])
def test_the_issue_repro_runs_in_bf16(recipe):
    """``with torch.autocast("cpu", dtype=torch.bfloat16): net(x)`` on a plain nn.Linear raised
    'self and mat2 must have the same dtype'. Now the output is bf16 like nn.Linear's, the
    factors (DoRA's row norms included) are the fp32 ones, and the fused GEMMs ran in bf16:
    the output equals the same formula evaluated on bf16-rounded operands."""
    torch.manual_seed(0)
    net = Adapter.from_recipe(recipe, rank=4).apply(nn.Sequential(nn.Linear(16, 8)), targets=["0"])
    perturb(net, 0)
    layer = adapted_layers(net)["0"]
    x = torch.randn(5, 16)
    fp32_factors = layer.factors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        factors = layer.factors()
    assert y.dtype == torch.bfloat16
    for a, b in zip(factors, fp32_factors):
        assert (a is None and b is None) or (a.dtype == torch.float32 and torch.equal(a, b))
    B, A, g = (None if t is None else t.to(torch.bfloat16) for t in fp32_factors)
    lo = x.to(torch.bfloat16)
    z = nn.functional.linear(lo, layer.base.weight.to(torch.bfloat16)).float() + ((lo @ A.T) @ B.T).float()
    z = (z if g is None else z * g.float()) + layer.base.bias.to(torch.bfloat16).float()  # g ⊙ (W̄x + B'A'x) + b
    torch.testing.assert_close(y.float(), z, rtol=2 * 2**-8, atol=2 * 2**-8)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("recipe", ["lora", "dora", "delora"])
def test_quantized_kinds_under_autocast(mode, recipe):
    """bitsandbytes layers: the output dtype is the quantized base's own under autocast
    (Linear4bit returns its input dtype, Linear8bitLt the autocast dtype), within 2·eps
    of the fp32 forward of the same model; every trainable slot gets a finite fp32 gradient."""
    pytest.importorskip("bitsandbytes")
    from lorakit.bitsandbytes import quantize

    for dtype in AUTOCAST_DTYPES:
        model, x = build_model(QUANTIZED_CASE)
        model = quantize(model, mode, skip=())
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            want = model(x).dtype
        RECIPES[recipe].adapter(QUANTIZED_CASE.rank).apply(model, targets=["0", "2"])
        perturb(model, 0)
        y32 = model(x)
        with torch.autocast("cpu", dtype=dtype):
            y = model(x)
        assert y.dtype == want
        err = (y.double() - y32.double()).abs().max() / (1 + y32.abs().max())
        assert err <= 2 * torch.finfo(dtype).eps, f"{mode} {recipe} {dtype}: {err:.2e}"
        with torch.autocast("cpu", dtype=dtype):
            loss = _loss(model, x)
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
                assert p.grad.abs().max() > 0, name


def test_the_check_has_teeth(monkeypatch):
    """check_autocast fails when the layer computes the low-rank term in another dtype than
    autocast's (here: forced fp32, the output then fp32 where nn.Linear gives bf16)."""
    from lorakit.core import functional

    monkeypatch.setattr(functional, "autocast_dtype", lambda x: None)
    monkeypatch.setattr(functional, "autocast_on", lambda device: False)
    with pytest.raises((AssertionError, RuntimeError)):
        check_autocast(RECIPES["lora"], CASES[0], torch.bfloat16)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def _dataset(n=8):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (n, 8), generator=g)]


@pytest.mark.parametrize("recipe", ["lora", "dora"])
def test_hf_trainer_bf16(tmp_path, recipe):
    """``Trainer(bf16=True)`` on the CPU (autocast through accelerate): a few steps train the
    adapter (every trainable slot moved), the loss stays finite, and the adapted layers really
    ran under autocast (their outputs are bf16)."""
    from transformers import Trainer, TrainingArguments

    from lorakit.transformers import LorakitCallback

    model = Adapter.from_recipe(recipe, rank=2).apply(tiny_llama())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen = set()
    for layer in adapted_layers(model).values():
        layer.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
                             bf16=True, use_cpu=True, save_strategy="no", report_to=[], logging_steps=1, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[LorakitCallback()])
    trainer.train()
    assert seen == {torch.bfloat16}, f"adapted layers gave {seen} under Trainer(bf16=True)"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and not torch.equal(p.detach(), before[n]), f"{n} did not train"


def _tokenizer():
    """A 64-token word-level tokenizer built in memory (the tiny model has no hub files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")


@pytest.mark.slow
def test_trl_sft_trainer_bf16(tmp_path):
    """TRL's SFTTrainer with bf16=True runs its first steps on a lorakit adapter, the adapted
    layers under autocast (``pip install trl==1.16.*``: it keeps torch and transformers as they are)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")

    model = Adapter.from_recipe("lora", rank=2).apply(tiny_llama())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    seen = set()
    for layer in adapted_layers(model).values():
        layer.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 64, (8, 8), generator=g).tolist()})
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-2,
                           bf16=True, use_cpu=True, save_strategy="no", report_to=[], logging_steps=1,
                           disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=_tokenizer())
    trainer.train()
    assert seen == {torch.bfloat16}, f"adapted layers gave {seen} under SFTTrainer(bf16=True)"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.sh runs it on a GPU)")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_under_cuda_autocast(recipe, dtype):
    for case in CASES:
        check_autocast(RECIPES[recipe], case, dtype, device="cuda")
    check_autocast(RECIPES[recipe], CASES[0], dtype, compile_backend="inductor", device="cuda")
