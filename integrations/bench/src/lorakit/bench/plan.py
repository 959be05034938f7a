"""``plan``: per-rank memory of a training run, on paper, before any weight is loaded.

For a transformers model config (a Llama-style decoder), a lorakit recipe and rank, a
base quantization, a world size, batch and sequence length, the bytes each rank holds:

- **weights**: the base. Every ``nn.Linear`` but ``lm_head`` in ``quantize``'s format
  (fp32 4 B, bf16 2 B per weight; ``nf4``: torchao's ``NF4Tensor``, ½ B per weight + an
  int8 scale per ``block`` 64 + an fp32 factor per ``block × scaler_block`` (64 × 256) + 68 B
  (its fp32 scaler mean and 16-value table); ``int8``: 1 B per weight + an fp32 scale and an
  int8 zero point per row: the real tensors' bytes, tests/test_plan.py); embeddings, norms,
  head in ``dtype``.
  ``shard=True`` (FSDP2, ``fully_shard`` on each decoder block and the root): each tensor's
  dim 0 split over ``world_size`` (⌈n/w⌉ rows each), plus what is gathered whole at the
  step's peak (``gather``, measured at 2 and 4 ranks at the start of a block's backward):
  the root's own tensors (embeddings, final norm, head: FSDP2 does not reshard the root
  after its forward) and two decoder blocks (the one running its backward and the one its
  backward prefetch all-gathers; fits hidden 128, about 0.8 block low at hidden 256:
  docs/distributed.md's table); ``shard=False`` (DDP): every rank holds all.
- **adapter**: counted exactly: the adapter is built on a meta-device copy of the model
  (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``, then
  ``Adapter.apply(..., restore={})``: the structure, no initializer runs), fp32.
  Residual buffers (PiSSA/OLoRA's ``residual_B``) are not counted.
- **optimizer**: AdamW: ``exp_avg`` + ``exp_avg_sq`` (2 × trainable, fp32) + a 4-byte
  ``step`` per trainable tensor. **gradients**: the trainable parameters only.
- **activations**: the peak of saved-for-backward tensors and the backward's temporaries,
  no activation checkpointing, SDPA attention (no ``S × S`` matrix), per token of
  ``batch × seq_len`` (``b`` bytes per element of the compute dtype): per decoder block
  ``b · (6h + 2kv + 4i + n_t·r)`` (norm inputs/outputs, rotated q, attention output;
  rotated k and v; gate, up, silu(gate), their product; ``Ax`` of the ``n_t`` adapted
  projections), plus the head's ``3V`` fp32 (the loss's log-softmax, its gradient and the
  logits' gradient alive together). The coefficients are an estimate, checked against
  the profiler's peak on tiny Llamas (within 5 %; tests/test_plan.py). Every rank runs its own ``batch``.

``total`` = weights + gather + adapter + optimizer + gradients + activations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lorakit.core import Adapter, AdapterError

QUANTIZE = ("fp32", "bf16", "nf4", "int8")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
PARTS = ("weights", "gather", "adapter", "optimizer", "gradients", "activations")


@dataclass(frozen=True)
class Plan:
    weights: int
    gather: int
    adapter: int
    optimizer: int
    gradients: int
    activations: int
    trainable: int  # adapter parameters (elements, whole model)

    @property
    def total(self) -> int:
        return sum(getattr(self, p) for p in PARTS)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _rows(n: int, world: int) -> int:
    return -(-n // world)


def _sharded(shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's FSDP2 shard (dim 0 padded to a multiple of ``world``)."""
    if not shape:
        return 1
    return _rows(shape[0], world) * math.prod(shape[1:])


def linear_bytes(out_f: int, in_f: int, quantize: str, block: int = 64, scaler_block: int = 256) -> int:
    """Bytes of one base linear weight ``out × in`` in ``quantize``'s format (see the module doc)."""
    n = out_f * in_f
    if quantize in DTYPE_BYTES:
        return n * DTYPE_BYTES[quantize]
    if quantize == "nf4":  # codes + int8 block scales + fp32 scaler factors + scaler mean and the 16-value table
        return n // 2 + n // block + 4 * (n // (block * scaler_block)) + 4 + 64
    if quantize == "int8":  # codes + an fp32 scale and an int8 zero point per row
        return n + 5 * out_f
    raise AdapterError(f"quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")


def meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan(config, recipe: str = "lora", rank: int = 16, quantize: str = "bf16", world_size: int = 1,
         batch: int = 1, seq_len: int = 2048, *, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"),
         shard: bool = True, dtype: str | None = None) -> Plan:
    """Per-rank bytes of one training step (AdamW) of ``recipe`` at ``rank`` on ``config``'s model.

    ``dtype``: of the unquantized tensors and activations (default: ``quantize`` when it is
    fp32/bf16, else bf16)."""
    if quantize not in QUANTIZE:
        raise AdapterError(f"quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if world_size < 1 or batch < 1 or seq_len < 1 or rank < 1:
        raise AdapterError(f"world_size, batch, seq_len, rank must be >= 1 (got {world_size}, {batch}, {seq_len}, "
                           f"{rank})")
    dtype = dtype or (quantize if quantize in DTYPE_BYTES else "bf16")
    b = DTYPE_BYTES[dtype]
    w = world_size if shard else 1
    model = meta_model(config)
    base = {id(t) for t in [*model.parameters(), *model.buffers()]}
    weights, root_bytes, block_bytes = 0, 0, {}
    for name, module in model.named_modules():
        for pname, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if type(module) is nn.Linear and pname == "weight" and not name.endswith("lm_head"):
                rows = _rows(t.shape[0], w)
                size = linear_bytes(rows, t.shape[1], quantize)
                full = linear_bytes(t.shape[0], t.shape[1], quantize)
            else:
                size = _sharded(tuple(t.shape), w) * (b if t.is_floating_point() else t.element_size())
                full = t.numel() * (b if t.is_floating_point() else t.element_size())
            weights += size
            block = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
            if block is not None:
                block_bytes[block] = block_bytes.get(block, 0) + full
            else:
                root_bytes += full
    Adapter.from_recipe(recipe, rank=rank).apply(model, targets=list(targets), restore={})
    params = [p for p in model.parameters() if id(p) not in base]
    buffers = [t for t in model.buffers() if id(t) not in base]
    trainable = [p for p in params if p.requires_grad]
    adapter = sum(_sharded(tuple(p.shape), w) * 4 for p in params) + sum(t.numel() * 4 for t in buffers)
    grads = sum(_sharded(tuple(p.shape), w) * 4 for p in trainable)
    optimizer = 2 * grads + 4 * len(trainable)
    largest = sorted(block_bytes.values(), reverse=True)[:2]  # two blocks whole: one running, one prefetched
    gather = root_bytes + sum(largest) if shard and world_size > 1 else 0
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    kv *= getattr(config, "head_dim", None) or h // heads
    n_t = sum(1 for t in targets if t in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"})
    per_layer = b * (6 * h + 2 * kv + 4 * i + n_t * rank)
    activations = batch * seq_len * (config.num_hidden_layers * per_layer + 3 * v * 4)
    return Plan(weights=weights, gather=gather, adapter=adapter, optimizer=optimizer, gradients=grads,
                activations=activations, trainable=sum(p.numel() for p in trainable))
