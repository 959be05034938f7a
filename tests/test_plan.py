"""``lorakit plan``: predicted bytes against a real training step on a tiny Llama (one process, CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lorakit.bench")


def test_plan_matches_a_measured_step():
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit.core as lk
    from lorakit.bench.measure import step_peak_bytes
    from lorakit.bench.methods import TARGETS, resident_bytes
    from lorakit.bench.plan import plan

    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=256, vocab_size=512,
                      num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa",
                      tie_word_embeddings=False)
    p = plan(cfg, "lora", 8, "fp32", 1, 2, 64, dtype="fp32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    weights = resident_bytes(model, None)
    lk.Adapter.from_recipe("lora", rank=8).apply(model, targets=TARGETS)
    adapter = resident_bytes(model, None) - weights
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    x = torch.randint(0, 512, (2, 64))

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()

    step()  # AdamW's state exists from here on
    resident = resident_bytes(model, opt)
    assert (p.weights, p.adapter, p.optimizer) == (weights, adapter, resident - weights - adapter)
    measured = resident + step_peak_bytes(step, "cpu")
    assert abs(p.total / measured - 1) < 0.10, (p.as_dict(), measured)


def test_plan_shards_over_ranks_and_refuses_bad_input():
    from transformers import LlamaConfig

    from lorakit.bench.plan import plan
    from lorakit.core import AdapterError

    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=256, vocab_size=512,
                      num_attention_heads=2, num_key_value_heads=2)
    one, four = plan(cfg, world_size=1), plan(cfg, world_size=4)
    assert four.optimizer < one.optimizer and four.weights < one.weights and four.gather > 0
    assert plan(cfg, quantize="nf4").weights < one.weights
    with pytest.raises(AdapterError, match="quantize"):
        plan(cfg, quantize="fp8")
