"""``quantize(model, "nf4" | "int8")``: torchao weights built by hand from a float model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorakit.core import AdapterError
from torchao.quantization import Int8WeightOnlyConfig, quantize_, to_nf4
from torchao.quantization.granularity import PerGroup, PerRow

QUANTIZE_MODES = ("nf4", "int8")
DEFAULT_SKIP = ("classifier", "lm_head", "score", "pooler")  # heads stay in float

def _nf4(name: str, weight: torch.Tensor, block_size: int, scaler_block_size: int) -> nn.Parameter:
    unit = block_size * scaler_block_size
    if weight.numel() % unit:
        raise AdapterError(f"quantize nf4: {name!r} has {weight.numel()} weights, not a multiple of block_size x "
                           f"scaler_block_size = {block_size} x {scaler_block_size} (torchao's to_nf4 needs whole "
                           "scaler blocks); pass smaller block sizes or add it to skip")
    return nn.Parameter(to_nf4(weight.detach().contiguous(), block_size, scaler_block_size), requires_grad=False)


@torch.no_grad()
def quantize(model: nn.Module, mode: str = "nf4", *, block_size: int = 64, scaler_block_size: int = 256,
             group_size: int | None = None, skip: Iterable[str] = DEFAULT_SKIP) -> nn.Module:
    """Quantize the float weight of every plain ``nn.Linear`` of ``model`` (but those whose
    last name is in ``skip``) with torchao, in place; the modules stay ``nn.Linear``:

    - ``"nf4"``: ``nn.Parameter(to_nf4(w, block_size, scaler_block_size))``, as torchtune's
      QLoRA (torchao's defaults 64 and 256: a weight needs a multiple of 16384 elements);
    - ``"int8"``: ``quantize_(model, Int8WeightOnlyConfig(granularity=...))``: per row, or
      per group of ``group_size`` input columns.

    All weights are checked before any is replaced: a bad size changes nothing."""
    if mode not in QUANTIZE_MODES:
        raise AdapterError(f"quantize mode {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    skip = set(skip)
    chosen = {n: m for n, m in model.named_modules()
              if type(m) is nn.Linear and type(m.weight) is nn.Parameter and n.rpartition(".")[2] not in skip}
    if mode == "nf4":
        weights = {n: _nf4(n, m.weight, block_size, scaler_block_size) for n, m in chosen.items()}
        for name, module in chosen.items():
            module.weight = weights[name]
    else:
        granularity = PerRow() if group_size is None else PerGroup(group_size)
        config = Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
        quantize_(model, config, filter_fn=lambda m, fqn: fqn in chosen and m is chosen[fqn])
    return model
