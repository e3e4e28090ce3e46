"""The training loop the sharded-model examples share (``classifier.py``, ``moe.py``).

Not an example itself: each example builds its model, shards it, and hands this loop the
module, its loss and its batches. Run as a script, an example finds this file because
Python puts the script's directory first on ``sys.path``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def train(
    module: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: Callable[[int], Batch],
    *,
    steps: int,
    lr: float,
    rank: int,
    items_per_step: int,
    unit: str,
) -> tuple[float, float]:
    """AdamW on ``module`` for ``steps`` steps; returns the first and last step's loss.

    ``batch(step)`` gives the step's ``(inputs, targets)``, the same on every rank. Rank 0
    prints the loss and the throughput (``items_per_step`` ``unit`` per step) every 10 steps
    and at the last one.
    """
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    first = last = math.nan
    start = time.perf_counter()
    for step in range(steps):
        x, y = batch(step)
        loss = loss_fn(module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = loss.item() if step == 0 else first
        last = loss.item()
        if rank == 0 and (step % 10 == 0 or step == steps - 1):
            rate = (step + 1) * items_per_step / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {last:.4f}  {rate:,.0f} {unit}/s")
    return first, last


def finish() -> None:
    """Leave together and tear gloo down before interpreter exit."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
