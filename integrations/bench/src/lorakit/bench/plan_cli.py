"""``lorakit plan``: the command-line front of :func:`lorakit.bench.plan.plan`."""

from __future__ import annotations

import json

from lorakit.core import AdapterError

HELP = "per-rank memory of a training run (weights, adapter, optimizer, gradients, activations), on paper"
FIELDS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
          "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size", "vocab": "vocab_size"}


def configure(parser) -> None:
    parser.add_argument("--config", help="a model folder or config.json (transformers AutoConfig); "
                                         "or give the dimensions below (a Llama config)")
    for name in FIELDS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--recipe", default="lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quantize", default="bf16", choices=("fp32", "bf16", "nf4", "int8"))
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="per rank")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--no-shard", action="store_true", help="replicated base (DDP) instead of FSDP2")
    parser.add_argument("--backend", default="nccl", choices=("nccl", "gloo"),
                        help="the all-gather's: gloo (CPU) holds a flat copy of a gathered block more")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def model_config(args):
    import os

    from transformers import AutoConfig, LlamaConfig

    if args.config:
        path = os.path.dirname(args.config) if args.config.endswith(".json") else args.config
        return AutoConfig.from_pretrained(path)
    missing = [f"--{n.replace('_', '-')}" for n in FIELDS if getattr(args, n) is None]
    if missing:
        raise AdapterError(f"{', '.join(missing)}: missing; give --config or every model dimension")
    return LlamaConfig(**{key: getattr(args, n) for n, key in FIELDS.items()})


def run(args) -> int:
    from .plan import PARTS, plan

    result = plan(model_config(args), args.recipe, args.rank, args.quantize, args.world_size, args.batch,
                  args.seq_len, shard=not args.no_shard, backend=args.backend)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(f"| per rank ({args.world_size} ranks, {args.quantize}, {args.recipe} r={args.rank}, "
          f"batch {args.batch} x {args.seq_len}) | GiB |")
    print("|---|---|")
    for part in (*PARTS, "total"):
        print(f"| {part} | {getattr(result, part) / 2**30:.2f} |")
    return 0
