"""``transformers.Trainer`` with ``LorakitCallback``: adapter-only checkpoints, resume
equal to an uninterrupted run, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from lorakit.core import Adapter, load, registry
from lorakit.transformers import LorakitCallback, adapter_keys

CHECKPOINTING = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
    else "gradient_checkpointing"


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def dataset(n=12):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (n, 8), generator=g)]


def adapted(recipe="lora"):
    return Adapter.from_recipe(recipe, rank=2).apply(tiny_llama())


def train(model, out, steps=6, resume=None, **args):
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=5e-2, save_strategy="steps", save_steps=3, logging_steps=100,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                             **args)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[LorakitCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def adapter_params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in adapter_keys(model)}


RESUME_RECIPES = [r for r in ("lora", "op-dora") if r in registry.load().recipes]


@pytest.mark.parametrize("recipe", RESUME_RECIPES)
def test_adapter_only_checkpoints_and_resume(tmp_path, recipe):
    full = adapted(recipe)
    before = adapter_params(full)
    train(full, tmp_path / "run")
    after = adapter_params(full)
    assert any(not torch.equal(before[k], after[k]) for k in after), "training did not change the adapter"

    ckpt = tmp_path / "run" / "checkpoint-3"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == adapter_keys(full)  # adapter only: no base weight was written
    assert (ckpt / "adapter_config.json").is_file()  # lorakit's native checkpoint beside it
    native = load(tiny_llama(), ckpt)  # ... which loads on a fresh base model
    assert set(adapter_params(native)) == set(saved)
    for k, v in adapter_params(native).items():
        assert torch.equal(v, saved[k])

    resumed = adapted(recipe)
    train(resumed, tmp_path / "run", resume=str(ckpt))
    for k, v in adapter_params(resumed).items():
        torch.testing.assert_close(v, after[k], rtol=1e-6, atol=1e-7)


def test_save_pretrained_is_adapter_only_only_while_adapted(tmp_path):
    from lorakit.core import merge_and_unload

    model = adapted()
    trainer = train(model, tmp_path / "run", steps=1)
    trainer.save_model(str(tmp_path / "final"))
    assert set(load_file(str(tmp_path / "final" / "model.safetensors"))) == adapter_keys(model)
    merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    ids = dataset(1)[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, model(input_ids=ids).logits)


def test_gradient_checkpointing_trains_like_without(tmp_path):
    plain, checkpointed = adapted(), adapted()
    train(plain, tmp_path / "a", steps=3)
    train(checkpointed, tmp_path / "b", steps=3, **{CHECKPOINTING: True})
    assert checkpointed.is_gradient_checkpointing if hasattr(checkpointed, "is_gradient_checkpointing") else True
    for k, v in adapter_params(checkpointed).items():
        torch.testing.assert_close(v, adapter_params(plain)[k], rtol=1e-5, atol=1e-6)


def test_reentrant_checkpointing_on_a_vision_model_still_trains(tmp_path):
    """ViT's input is pixel_values, so transformers does not make the embedding output
    require grad; with re-entrant checkpointing no gradient would reach the adapters
    inside checkpointed blocks unless the callback makes it require grad."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                                num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=32, num_labels=2))
    Adapter.from_recipe("lora", rank=2).apply(model)  # registered default targets: query, value
    before = adapter_params(model)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(1, 8, 8, generator=g), "labels": i % 2} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=5e-2, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, **{CHECKPOINTING: True,
                                                   f"{CHECKPOINTING}_kwargs": {"use_reentrant": True}})
    Trainer(model=model, args=args, train_dataset=data, callbacks=[LorakitCallback()]).train()
    after = adapter_params(model)
    moved = [k for k in after if k.endswith(".B")]
    assert moved and all(not torch.equal(before[k], after[k]) for k in moved)
