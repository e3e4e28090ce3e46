"""A small mixture-of-experts language model trained with whale's expert parallelism.

The MoE layer's experts are spread over the ranks (``split`` around the layer); tokens travel to
their experts by all-to-all and back. Uneven expert counts per rank follow ``--expert-sizes``.
Run on 2 CPU processes::

    torchrun --nproc_per_node=2 examples/moe.py
    torchrun --nproc_per_node=2 examples/moe.py --experts 6 --expert-sizes 4,2 --steps 40

As a plain script it runs as a world of one.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import whale as wh
from whale.capture import capture
from whale.rewrite import shard_model

try:  # examples/_train_loop.py: the training loop shared with classifier.py
    from ._train_loop import finish, train  # imported as examples.moe
except ImportError:
    from _train_loop import finish, train  # run as a script: its directory is on sys.path


class Expert(nn.Module):
    """One feed-forward expert."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MoE(nn.Module):
    """Top-k softmax routing over ``num_experts`` experts, weights renormalized (Mixtral).

    Written densely (every expert sees every token, weighted by a mostly-zero combine matrix)
    so that the local model is easy to read and traceable; whale's sharded version sends each
    token only to its k experts.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        combine = torch.zeros_like(probs).scatter(-1, ids, weights)
        out = 0
        for i, expert in enumerate(self.experts):
            out = out + combine[..., i : i + 1] * expert(x)
        return out


class MoELM(nn.Module):
    """Embedding, one MoE block with a residual, a LayerNorm and a vocabulary head."""

    def __init__(self, vocab: int = 128, d_model: int = 64, d_hidden: int = 128, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.norm = nn.LayerNorm(d_model)
        with wh.split():  # experts spread over the tensor-parallel group
            self.moe = MoE(d_model, d_hidden, num_experts, top_k)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        h = h + self.moe(self.norm(h))
        return self.head(h)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batch(vocab: int, rows: int, length: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable stream: the next token is (token * 5 + 3) mod vocab; same on every rank."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(vocab, (rows, 1), generator=g)
    seq = [start]
    for _ in range(length):
        seq.append((seq[-1] * 5 + 3) % vocab)
    seq = torch.cat(seq, dim=1)
    return seq[:, :-1], seq[:, 1:]


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-sizes", type=str, default=None, help="experts per rank, e.g. 3,1")
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)

    info = wh.init()
    torch.manual_seed(0)
    model = MoELM(num_experts=args.experts, top_k=args.top_k)
    x, _ = batch(128, args.batch, args.length, 0)
    sizes = {"moe": [int(s) for s in args.expert_sizes.split(",")]} if args.expert_sizes else None
    sharded = shard_model(model, capture(model, (x,)), shard_sizes=sizes, loss_fn=lm_loss)
    if info.rank == 0:
        print(sharded.plan.summary())
    first, last = train(sharded.module, lm_loss, lambda step: batch(128, args.batch, args.length, step),
                        steps=args.steps, lr=args.lr, rank=info.rank,
                        items_per_step=args.batch * args.length, unit="tokens")
    if info.rank == 0:
        print(f"loss {first:.3f} -> {last:.3f} over {args.steps} steps on {info.world_size} ranks")
    return last


if __name__ == "__main__":
    main()
    finish()
