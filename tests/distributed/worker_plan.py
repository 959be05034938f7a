"""One rank of the ``lorakit plan`` check under FSDP2 (tests/test_plan.py)::

    worker_plan.py OUT_DIR [SHAPE ...]     # SHAPE = hidden,intermediate,vocab,batch,seq[,nf4|int8]

A tiny Llama (fp32, LoRA r=8 on all seven projections) sharded with ``fully_shard`` per
decoder layer and at the root (at world size 1: not sharded), AdamW; after one step (AdamW's state exists) the rank's
resident bytes (its local shards of weights, adapter and optimizer state, by storage) and
the extra peak of the next step (``lorakit.bench.measure.step_peak_bytes``, the same as the
1-rank test; also the lowest of it and five further steps') go to
``plan-{shape}-world{w}-rank{r}.json`` beside the plan's prediction.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import lorakit.core as lk  # noqa: E402
from lorakit.bench.measure import step_peak_bytes  # noqa: E402
from lorakit.bench.methods import TARGETS  # noqa: E402
from lorakit.bench.plan import plan  # noqa: E402
from lorakit.core.layer_kinds import plain_tensors  # noqa: E402


def config(hidden: int, intermediate: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=2, intermediate_size=intermediate, vocab_size=vocab,
                       num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa",
                       tie_word_embeddings=False)


def local_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor: its local shard's; a
    torchao tensor: its inner tensors')."""
    seen = {}
    for t in tensors:
        for inner in plain_tensors(t.to_local() if isinstance(t, DTensor) else t).values():
            seen[inner.untyped_storage().data_ptr()] = inner.untyped_storage().nbytes()
    return sum(seen.values())


def measure(shape: tuple[int, ...], world: int) -> dict:
    from transformers import LlamaForCausalLM

    hidden, intermediate, vocab, batch, seq, *quantized = shape
    mode = quantized[0] if quantized else "fp32"
    cfg = config(hidden, intermediate, vocab)
    predicted = plan(cfg, "lora", 8, mode, world, batch, seq, dtype="fp32", backend="gloo")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    if mode != "fp32":  # a torchao base: every decoder linear, the head stays fp32
        from lorakit.torchao import quantize

        base = quantize(base, mode, skip=("lm_head",))
    model = lk.Adapter.from_recipe("lora", rank=8).apply(base, targets=TARGETS)
    if world > 1:  # one process: the plain model, as tests/test_plan.py's 1-rank check
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(dist.get_rank()))

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()

    step()  # AdamW's state exists from here on
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    resident = local_bytes([*model.parameters(), *model.buffers(), *state])
    peak = step_peak_bytes(step, "cpu")
    # and the lowest peak of this and five further steps: now and then a rank's steps hold one block
    # more (an all-gather output still referred to under gloo, timing-dependent; docs/distributed.md)
    lower = min(peak, *(step_peak_bytes(step, "cpu") for _ in range(5)))
    return {"predicted": predicted.as_dict(), "resident": resident, "step_peak": peak, "measured": resident + peak,
            "measured_lower": resident + lower}


def main() -> None:
    out, shapes = Path(sys.argv[1]), [tuple(int(v) if v.isdigit() else v for v in s.split(",")) for s in sys.argv[2:]]
    rank, world = common.init_process_group()
    for shape in shapes:
        name = f"plan-{'x'.join(map(str, shape))}-world{world}"
        with common.recorded(out, name, rank):
            (out / f"{name}-rank{rank}.json").write_text(json.dumps(measure(shape, world)))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
