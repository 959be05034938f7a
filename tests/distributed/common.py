"""What the distributed tests and their worker processes share: a tiny model, its
data, one training step, and how results are written.

The same code runs single-process (in the pytest process: the reference) and on
every rank of a 2-process gloo world (``worker.py``), so any difference between
the two comes from the distributed engine, not from the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lorakit.core import Adapter

IN, HIDDEN, OUT = 12, 20, 5  # odd sizes on purpose: FSDP2 pads uneven shards
RANK = 4
TARGETS = ["q", "up", "down"]  # every block's three Linears; the head stays plain
GLOBAL_BATCH, STEPS, LR = 8, 3, 0.05


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(IN, IN)
        self.up = nn.Linear(IN, HIDDEN)
        self.down = nn.Linear(HIDDEN, IN)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.q(x))))


class Tiny(nn.Module):
    """Two residual blocks and a head: the smallest model with FSDP2 units to shard."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(IN, OUT)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def base_model() -> Tiny:
    """The "pretrained" model: fixed weights, identical in every process."""
    torch.manual_seed(1234)
    return Tiny()


def adapter(recipe: str) -> Adapter:
    return Adapter.from_recipe(recipe, rank=RANK, seed=7)


def build(recipe: str) -> Tiny:
    return adapter(recipe).apply(base_model(), targets=TARGETS)


def data(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of a fixed regression problem."""
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g))
            for _ in range(steps)]


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int):
    """This rank's equal slice of a global batch (as a DistributedSampler would give)."""
    n = GLOBAL_BATCH // world
    return tuple(t[rank * n:(rank + 1) * n] for t in batch)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # SGD with momentum: stateful (its buffers shard under FSDP2) and free of
    # Adam's division by tiny second moments, which would turn rounding noise
    # of the gradient reduction into visible parameter differences.
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)


def train(model: nn.Module, batches, rank: int = 0, world: int = 1) -> list[float]:
    """Mean-squared-error steps; returns the *global* loss of each step.

    With ``world`` ranks each rank sees 1/world of every global batch; DDP and
    FSDP2 average gradients, so the update equals the single-process one.
    """
    opt = optimizer(model)
    losses = []
    for batch in batches:
        x, y = shard(batch, rank, world)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if world > 1:  # mean of equal-sized slices = loss of the global batch
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


@torch.no_grad()
def evaluate(model: nn.Module) -> dict[str, torch.Tensor]:
    """Eval-mode outputs on a fixed batch, twice: the second forward is served from
    the adapted layers' eval cache, which must survive FSDP2 freeing its shards."""
    model.eval()
    x = torch.randn(GLOBAL_BATCH, IN, generator=torch.Generator().manual_seed(3))
    out = {"eval.first": model(x), "eval.cached": model(x)}
    model.train()
    return out


def write_result(out: Path, name: str, rank: int, tensors: dict, meta: dict) -> None:
    """One rank's result of case ``name``: ``{name}-rank{r}.safetensors`` and ``.json``,
    which the test reads back and compares with the single-process reference."""
    from safetensors.torch import save_file

    save_file(tensors, str(out / f"{name}-rank{rank}.safetensors"))
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(meta))


@contextlib.contextmanager
def recorded(out: Path, name: str, rank: int):
    """Run one case; on error write ``{name}-rank{r}.error`` and go on with the next.

    The failures this catches (a recipe FSDP2 cannot shard, a bad gather) happen on
    both ranks alike, so the world stays in step; the test reports the traceback of
    exactly the case that failed instead of losing the whole run.
    """
    try:
        yield
    except Exception:
        (out / f"{name}-rank{rank}.error").write_text(traceback.format_exc())


def init_process_group() -> tuple[int, int]:
    """Join the gloo world: torchrun's env:// when launched by torchrun/accelerate,
    else the file store given by the test (no TCP listener at all)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if "LORAKIT_STORE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", init_method=f"file://{os.environ['LORAKIT_STORE']}",
                                rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()
