"""A small CNN image classifier trained data parallel with whale, on synthetic images.

Run on 2 CPU processes::

    torchrun --nproc_per_node=2 examples/cnn.py

The model is unannotated: whale's default strategy replicates it. GroupNorm rather than
BatchNorm keeps every replica's result equal to the local model's (BatchNorm would use each
replica's own batch statistics, as with DDP).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import whale as wh


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(4, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)


class CNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(ConvBlock(3, width), ConvBlock(width, 2 * width))
        self.head = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class SyntheticImages:
    """16x16 RGB images: a fixed template per class plus noise, so the classes are learnable."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(num_classes, 3, 16, 16, generator=g)
        self.num_classes = num_classes

    def batch(self, batch_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + step)
        y = torch.randint(self.num_classes, (batch_size,), generator=g)
        x = self.templates[y] + 1.5 * torch.randn(batch_size, 3, 16, 16, generator=g)
        return x, y


def whale_target(batch: int = 64) -> tuple[CNN, tuple[torch.Tensor]]:
    """For ``whale plan examples/cnn.py``: the model and one global batch of inputs."""
    return CNN(), (SyntheticImages().batch(batch, 0)[0],)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)

    info = wh.init()
    torch.manual_seed(0)
    data = SyntheticImages()
    x, y = data.batch(args.batch, step=0)
    model = wh.parallelize(CNN(), loss_fn=F.cross_entropy, example_inputs=(x,))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = data.batch(args.batch, step)
        loss = model.step(x, y).item()
        opt.step()
        opt.zero_grad()
        if info.rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            img_s = (step + 1) * args.batch / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss:.4f}  {img_s:,.0f} images/s (global)")
    return loss


if __name__ == "__main__":
    main()
