"""The NF4 + FSDP2 tests' model: tests/distributed/common.py's training on a base whose
linears hold torchao ``NF4Tensor`` weights (torchtune's QLoRA layout), 64 wide so every
rank of 1, 2 or 4 holds whole scaler blocks of its rows (16 blocks of 64 weights)."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core import Adapter

WIDTH, OUT = 64, 5
TARGETS = ["q", "up", "down"]
SCALER_BLOCK = 16  # 64 × 64 weights: 64 blocks of 64, 4 scaler blocks, whole on each of up to 4 ranks


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(WIDTH, WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.q(x))))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, OUT)  # stays float

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def base_model() -> Tiny:
    from lorakit.torchao import quantize

    torch.manual_seed(1234)
    return quantize(Tiny(), "nf4", scaler_block_size=SCALER_BLOCK, skip=("head",))


def build(recipe: str) -> Tiny:
    return Adapter.from_recipe(recipe, rank=4, seed=7).apply(base_model(), targets=TARGETS)


def data(steps: int = 3, batch: int = 8):
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(batch, WIDTH, generator=g), torch.randn(batch, OUT, generator=g)) for _ in range(steps)]
