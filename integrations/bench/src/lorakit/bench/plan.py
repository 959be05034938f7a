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
  dim 0 split over ``world_size`` (⌈n/w⌉ rows each), buffers (rotary ``inv_freq``) whole;
  ``shard=False`` (DDP): every rank holds all.
- **gather** (FSDP2, ``world_size`` > 1): what is all-gathered whole at the step's peak
  moment (below): the root's own tensors (embeddings, final norm, head: FSDP2 does not
  reshard the root after its forward) and decoder blocks' base and adapter tensors (the
  largest blocks: ``B₁ ≥ B₂``), as the peak moment has them.
- **adapter**: counted exactly: the adapter is built on a meta-device copy of the model
  (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``, then
  ``Adapter.apply(..., restore={})``: the structure, no initializer runs), fp32.
  Residual buffers (PiSSA/OLoRA's ``residual_B``) are not counted.
- **optimizer**: AdamW: ``exp_avg`` + ``exp_avg_sq`` (2 × trainable, fp32) + a 4-byte
  ``step`` per trainable tensor. **gradients**: the trainable parameters only.
- **activations**: the saved-for-backward tensors, no activation checkpointing, SDPA
  attention (no ``S × S`` matrix), per token of ``batch × seq_len`` (``b`` bytes per element
  of the compute dtype): per decoder block ``b · (6h + 2kv + 4i + n_t·r)`` (norm
  inputs/outputs, rotated q, attention output; rotated k and v; gate, up, silu(gate), their
  product; ``Ax`` of the ``n_t`` adapted projections), plus the peak moment's transient.
  Every rank runs its own ``batch``.

The peak is the largest of three moments, each what is gathered + a transient:

- *the head's backward*: ``root + B₁`` (the root's pre-backward has prefetched the last block),
  transient ``3V`` fp32 per token (the loss's log-softmax, its gradient and the logits'
  gradient alive together);
- *a block's backward prefetch* (the start of block ``l``'s backward, all-gathering block
  ``l − 1``): ``root + B₁ + B₂`` (block ``l`` whole, block ``l − 1``'s all-gather output),
  ``root + B₁ + 2 B₂`` with ``backend="gloo"``: gloo's ``_allgather_base`` gathers into a
  flat tensor of its own (``newLikeFlat``) and copies it into the output, so the gathered
  block is there twice; NCCL gathers in place. No transient;
- *an NF4 linear's forward* (``quantize="nf4"``): ``root + B₁ + B₂`` (the running block whole
  and its all-gather output, whose free FSDP2 defers to the next block's copy-out; blocks
  alike), transient ``(8 + 3b) · n`` for the largest
  base linear (``n = out × in``): torchao's ``F.linear`` dequantizes the whole weight
  (``get_original_weight``: two int64 code tensors of ``n/2``, two table lookups and two
  scaled halves of ``n/2`` in ``b``, their interleaved ``n``, all alive at the ``stack``).
  lorakit-torchao's backward (``linear_t``, row blocks of at most 4M weights) holds less.
  int8's dequantization is not modelled (not measured).

Unsharded (or one rank) nothing is gathered. Checked against the profiler's peak on tiny
Llamas at 1, 2 and 4 gloo ranks (fp32 and NF4: within 5 % of each rank's lowest of six steps;
tests/test_plan.py, docs/distributed.md).

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
BACKENDS = ("nccl", "gloo")
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
         shard: bool = True, dtype: str | None = None, backend: str = "nccl") -> Plan:
    """Per-rank bytes of one training step (AdamW) of ``recipe`` at ``rank`` on ``config``'s model.

    ``dtype``: of the unquantized tensors and activations (default: ``quantize`` when it is
    fp32/bf16, else bf16). ``backend``: the all-gather's ("nccl", or "gloo" on CPU: see the
    module doc)."""
    if quantize not in QUANTIZE:
        raise AdapterError(f"quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if backend not in BACKENDS:
        raise AdapterError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if world_size < 1 or batch < 1 or seq_len < 1 or rank < 1:
        raise AdapterError(f"world_size, batch, seq_len, rank must be >= 1 (got {world_size}, {batch}, {seq_len}, "
                           f"{rank})")
    dtype = dtype or (quantize if quantize in DTYPE_BYTES else "bf16")
    b = DTYPE_BYTES[dtype]
    w = world_size if shard else 1
    model = meta_model(config)
    base = {id(t) for t in [*model.parameters(), *model.buffers()]}
    weights, root_bytes, block_bytes, largest_linear = 0, 0, {}, 0
    for name, module in model.named_modules():
        own_buffers = {id(t) for t in module.buffers(recurse=False)}  # FSDP2 shards parameters, not buffers
        for pname, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if type(module) is nn.Linear and pname == "weight" and not name.endswith("lm_head"):
                size = linear_bytes(_rows(t.shape[0], w), t.shape[1], quantize)
                full = linear_bytes(t.shape[0], t.shape[1], quantize)
                largest_linear = max(largest_linear, t.numel())
            else:
                element = b if t.is_floating_point() else t.element_size()
                full = t.numel() * element
                size = full if id(t) in own_buffers else _sharded(tuple(t.shape), w) * element
            weights += size
            if id(t) not in own_buffers:  # what FSDP2 all-gathers
                root_bytes += _add_to_block(block_bytes, f"{name}.{pname}", full)
    Adapter.from_recipe(recipe, rank=rank).apply(model, targets=list(targets), restore={})
    params = [p for p in model.parameters() if id(p) not in base]
    buffers = [t for t in model.buffers() if id(t) not in base]
    trainable = [p for p in params if p.requires_grad]
    for name, t in model.named_parameters():  # adapter parameters gather with their block
        if id(t) not in base and ".layers." in name:
            _add_to_block(block_bytes, name, t.numel() * 4)
    adapter = sum(_sharded(tuple(p.shape), w) * 4 for p in params) + sum(t.numel() * 4 for t in buffers)
    grads = sum(_sharded(tuple(p.shape), w) * 4 for p in trainable)
    optimizer = 2 * grads + 4 * len(trainable)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    kv *= getattr(config, "head_dim", None) or h // heads
    n_t = sum(1 for t in targets if t in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"})
    tokens = batch * seq_len
    saved = tokens * config.num_hidden_layers * b * (6 * h + 2 * kv + 4 * i + n_t * rank)
    blocks = [*sorted(block_bytes.values(), reverse=True), 0][:2] if shard and world_size > 1 else [0, 0]
    root = root_bytes if shard and world_size > 1 else 0
    moments = [(root + blocks[0], tokens * 3 * v * 4),  # the head's backward
               # a block's backward prefetch: the block whole, the next one's all-gather output (twice: gloo)
               (root + blocks[0] + blocks[1] * (2 if backend == "gloo" else 1), 0)]
    if quantize == "nf4":  # the largest linear dequantized whole in its forward
        moments.append((root + sum(blocks), (8 + 3 * b) * largest_linear))
    gather, transient = max(moments, key=sum)
    return Plan(weights=weights, gather=gather, adapter=adapter, optimizer=optimizer, gradients=grads,
                activations=saved + transient, trainable=sum(p.numel() for p in trainable))


def _add_to_block(block_bytes: dict, name: str, nbytes: int) -> int:
    """Add ``nbytes`` to ``name``'s decoder block (``….layers.<i>.…``); returns what belongs to the root."""
    if ".layers." not in name:
        return nbytes
    block = name.split(".layers.")[1].split(".")[0]
    block_bytes[block] = block_bytes.get(block, 0) + nbytes
    return 0
