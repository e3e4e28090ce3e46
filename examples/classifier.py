"""Whale's large-classification case: a classifier over 100,000 classes with its head split.

The feature extractor is small and replicated; the classifier's weight (classes x width) is what
does not fit, so ``split`` shards it by class over the ranks, and the softmax cross-entropy is
computed on the shards (each rank holds only its classes' logits; no rank ever holds the full
logits or the full weight). The model is built on the meta device, so the full head is never
allocated anywhere: each rank initializes only its own shard. Faster devices can take more
classes with ``--class-sizes``.

Run on 2 CPU processes::

    torchrun --nproc_per_node=2 examples/classifier.py
    torchrun --nproc_per_node=2 examples/classifier.py --classes 200000 --class-sizes 120000,80000

As a plain script it runs as a world of one (no sharding).
"""

from __future__ import annotations

import argparse
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

import whale as wh
from whale.capture import capture
from whale.rewrite import shard_model

try:  # examples/_train_loop.py: the training loop shared with moe.py
    from ._train_loop import finish, train  # imported as examples.classifier
except ImportError:
    from _train_loop import finish, train  # run as a script: its directory is on sys.path


class LargeClassifier(nn.Module):
    """``forward(x (B, d_in)) -> logits (B, classes)``: an MLP trunk, a split classifier head."""

    def __init__(self, d_in: int = 64, width: int = 256, classes: int = 100_000) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.LayerNorm(width))
        with wh.split():  # the head is sharded by class over the tensor-parallel group
            self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class SyntheticClasses:
    """Each class has a prototype; a sample is its prototype plus noise. Classes follow a skewed
    (Zipf-like) frequency, as real label distributions do, so frequent classes are learned first."""

    def __init__(self, classes: int, d_in: int, seed: int = 0) -> None:
        self.classes, self.d_in, self.seed = classes, d_in, seed

    def batch(self, rows: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + step)
        y = (self.classes * torch.rand(rows, generator=g) ** 4).long()
        # Prototypes drawn per class from a class-seeded generator: same on every rank, no table.
        protos = torch.stack([torch.randn(self.d_in, generator=torch.Generator().manual_seed(self.seed * 7919 + int(c)))
                              for c in y])
        return protos + 0.3 * torch.randn(rows, self.d_in, generator=g), y


def init_shards(sharded, rank: int) -> None:
    """Initialize this rank's parameters: replicated ones alike on every rank, shards independently."""
    for name, p in sharded.module.named_parameters():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + (1000 * rank if name in sharded.param_shards else 0))
        with torch.no_grad():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name.endswith("weight"):
                p.fill_(1.0)  # a LayerNorm scale
            else:
                p.zero_()


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--class-sizes", type=str, default=None, help="classes per rank, e.g. 60000,40000")
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)

    info = wh.init()
    data = SyntheticClasses(args.classes, args.d_in)
    with torch.device("meta"):
        model = LargeClassifier(args.d_in, args.width, args.classes)
    sizes = {"head": [int(s) for s in args.class_sizes.split(",")]} if args.class_sizes else None
    x, _ = data.batch(args.batch, 0)
    sharded = shard_model(model, capture(model, (x,)), shard_sizes=sizes, loss_fn=F.cross_entropy)
    sharded.module.to_empty(device=info.device)
    init_shards(sharded, info.rank)
    if info.rank == 0:
        print(sharded.plan.summary())
    # sharded.loss_fn takes the logits still sharded by class.
    first, last = train(sharded.module, sharded.loss_fn, lambda step: data.batch(args.batch, step),
                        steps=args.steps, lr=args.lr, rank=info.rank, items_per_step=args.batch, unit="samples")
    if info.rank == 0:
        held = {n: p.numel() for n, p in sharded.module.named_parameters()}
        total = sum(math.prod(s.full_shape) for s in sharded.full_specs.values())
        total += sum(n for name, n in held.items() if name not in sharded.full_specs)
        print(f"loss {first:.3f} -> {last:.3f} over {args.steps} steps on {info.world_size} ranks; "
              f"rank 0 holds {sum(held.values()):,} of the model's {total:,} parameters")
    return last


if __name__ == "__main__":
    main()
    finish()
