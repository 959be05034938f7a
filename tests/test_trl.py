"""TRL's SFTTrainer and DPOTrainer on a lorakit model with LorakitCallback (docs/integrations/trl.md):
only adapter parameters train, checkpoints hold the adapter only (and a native checkpoint), resume is
bit-identical to an uninterrupted run, the PEFT export loads in PeftModel with equal logits; DPO's
reference is the base with the adapter disabled, no second copy of the weights. Offline: a tiny
Llama and an in-memory word-level tokenizer with a tiny chat template."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.core import Adapter, disabled, load
from lorakit.transformers import LorakitCallback, adapter_keys, export_peft, reference_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(60)} | {"user": 60, "assistant": 61}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")
    out.chat_template = TEMPLATE
    return out


def _words(g, n):
    return " ".join(f"t{i}" for i in torch.randint(2, 60, (n,), generator=g).tolist())


def sft_data(n=12):
    g = torch.Generator().manual_seed(3)
    return datasets.Dataset.from_list([{"messages": [{"role": "user", "content": _words(g, 3)},
                                                     {"role": "assistant", "content": _words(g, 4)}]}
                                       for _ in range(n)])


def dpo_data(n=12):
    g = torch.Generator().manual_seed(4)
    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": _words(g, 3)}],
                                        "chosen": [{"role": "assistant", "content": _words(g, 3)}],
                                        "rejected": [{"role": "assistant", "content": _words(g, 3)}]}
                                       for _ in range(n)])


COMMON = dict(max_steps=6, per_device_train_batch_size=2, learning_rate=5e-2, use_cpu=True, save_strategy="steps",
              save_steps=3, report_to=[], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0)


def make_trainer(kind, model, out):
    if kind == "sft":
        return trl.SFTTrainer(model=model, args=trl.SFTConfig(output_dir=str(out), **COMMON),
                              train_dataset=sft_data(), processing_class=tokenizer(), callbacks=[LorakitCallback()])
    return trl.DPOTrainer(model=model, ref_model=reference_model(model), args=trl.DPOConfig(output_dir=str(out),
                          **COMMON), train_dataset=dpo_data(), processing_class=tokenizer(),
                          callbacks=[LorakitCallback()])


def state(model, keys=None):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if keys is None or k in keys}


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_trainer_adapter_only_resume_export(kind, tmp_path):
    model = Adapter.from_recipe("lora", rank=2).apply(tiny_llama())
    ours = adapter_keys(model)
    before = state(model)
    trainer = make_trainer(kind, model, tmp_path / "run")
    trainer.train()
    after = state(model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= ours, f"non-adapter tensors changed: {sorted(changed - ours)[:5]}"
    if kind == "dpo":  # the reference is the base: step 1 compares the policy with itself
        first = next(h for h in trainer.state.log_history if "loss" in h)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0
        assert not list(trainer.ref_model.parameters())  # shares the policy's weights, holds none

    ckpt = tmp_path / "run" / "checkpoint-3"
    assert set(load_file(str(ckpt / "model.safetensors"))) == ours  # adapter only
    load(tiny_llama(), ckpt)  # the native checkpoint beside it loads on a fresh base

    resumed = Adapter.from_recipe("lora", rank=2).apply(tiny_llama())
    make_trainer(kind, resumed, tmp_path / "run").train(resume_from_checkpoint=str(ckpt))
    for k, v in state(resumed, ours).items():
        assert torch.equal(v, after[k]), f"{k}: resumed run differs from the uninterrupted one"

    from peft import PeftModel

    export_peft(model, tmp_path / "peft")
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():  # the class's forward: TRL's bf16 default left accelerate's autocast wrapper on model.forward
        ours = type(model).forward(model, input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()(ids).logits
        assert (peft_logits - ours).abs().max() <= 1e-5


def test_reference_model_is_the_base_without_a_copy():
    model = Adapter.from_recipe("dora", rank=2).apply(tiny_llama())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    ref = reference_model(model)
    ids = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        base = tiny_llama()(ids).logits
        assert torch.equal(ref(ids).logits, base)
        assert not torch.equal(model(ids).logits, base)  # the policy keeps its adapter outside the call
        with disabled(model):
            assert torch.equal(model(ids).logits, base)
    assert ref.config is model.config and not list(ref.parameters())
    with pytest.raises(Exception, match="has no lorakit adapter to disable"):
        reference_model(tiny_llama())


def test_grpo_runs_on_cpu_adapter_only(tmp_path):
    """GRPOTrainer generates with the adapted model itself (no vLLM) on CPU: only the adapter trains and
    its checkpoints hold the adapter only, with the native checkpoint beside them."""
    model = Adapter.from_recipe("lora", rank=2).apply(tiny_llama())
    before = state(model)
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "t3 t4 t5"}]} for _ in range(8)])

    def reward(completions, **kwargs):  # longer answers score higher: any signal will do
        return [float(len(c[-1]["content"] if isinstance(c, list) else c)) for c in completions]

    config = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                            max_completion_length=4, learning_rate=5e-2, use_cpu=True, report_to=[], logging_steps=1,
                            disable_tqdm=True, save_strategy="steps", save_steps=2, seed=0, bf16=False)
    trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tokenizer(),
                    callbacks=[LorakitCallback()]).train()
    changed = {k for k, v in state(model).items() if not torch.equal(v, before[k])}
    assert changed and changed <= adapter_keys(model)
    assert set(load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))) == adapter_keys(model)
    load(tiny_llama(), tmp_path / "checkpoint-2")
