"""The benchmark's subjects: one small Llama-like model, adapted by lorakit or PEFT.

Every method gets the *same* frozen base weights (shared tensors, not copies: the
base is built once from a seed) and the same target projections, so the only
difference between two runs is the adapter.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core import Adapter, AdapterError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORAKIT_RECIPES = ("lora", "dora", "op-lora", "delora", "loldu", "pissa")
PEFT_METHODS = ("lora", "dora", "delora")
PEFT_LABELS = {"lora": "LoRA", "dora": "DoRA", "delora": "DeLoRA"}


@dataclass(frozen=True)
class Method:
    library: str  # "lorakit" or "peft"
    name: str  # recipe name or PEFT method

    @property
    def label(self) -> str:
        if self.library == "reference":
            return "no adapter (floor)"
        return f"lorakit {self.name}" if self.library == "lorakit" else f"PEFT {PEFT_LABELS[self.name]}"


#: the frozen model's own forward and backward (down to the embeddings), with no
#: adapter and no optimizer: a lower bound for every method's step
FLOOR = Method("reference", "floor")


def build_base(hidden: int, layers: int, intermediate: int, vocab: int, seq: int, seed: int,
               dtype: torch.dtype, device: str) -> nn.Module:
    """A randomly initialized ``LlamaForCausalLM`` (no hub), head dim 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % 64:
        raise AdapterError(f"--hidden {hidden}: use a multiple of 64 (attention heads of dimension 64)")
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                         vocab_size=vocab, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=max(seq, 128),
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def share_base(base: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers *are* the base's tensors."""
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


def adapt(method: Method, base: nn.Module, rank: int, seed: int) -> nn.Module:
    """A fresh model sharing ``base``'s weights, with the method's adapter on TARGETS."""
    model = share_base(base)
    if method == FLOOR:
        return model
    if method.library == "lorakit":
        Adapter.from_recipe(method.name, rank=rank, seed=seed).apply(model, targets=TARGETS)
        return model
    import peft

    torch.manual_seed(seed)
    if method.name == "delora":
        config = peft.DeloraConfig(r=rank, target_modules=TARGETS)
    else:
        config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS,
                                 use_dora=method.name == "dora")
    with warnings.catch_warnings():
        # peft (<= 0.21) reads model.is_gradient_checkpointing, which transformers >= 5.24
        # deprecates with a FutureWarning: peft's call, not the user's, so not shown to them
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(model, config)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of every distinct tensor storage the method keeps between steps: the
    (shared) base weights and buffers, the adapter, and the optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    for state in optimizer.state.values() if optimizer is not None else ():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
