"""A small GPT trained data parallel with whale, on a synthetic corpus (no downloads).

Run on 2 CPU processes::

    torchrun --nproc_per_node=2 examples/gpt.py

Useful flags: ``--steps 50 --batch 16 --layers 4 --embd 128 --micro-batches 2``; give faster
devices more rows with ``--row-weights 3,1``. As a plain script it runs as a world of one.

Pipelined over 2 stages (blocks split evenly, 1F1B over 4 micro-batches)::

    torchrun --nproc_per_node=2 examples/gpt.py --stages 2 --micro-batches 4

``--schedule gpipe|1f1b|interleaved_1f1b`` picks the schedule; with 4 processes and
``--stages 2`` each stage is also replicated data parallel (2 stages x 2 replicas).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import whale as wh


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        with wh.replicate():  # the transformer blocks run data parallel
            self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, a mean over every token of the rows given."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class SyntheticCorpus:
    """A learnable token stream: each token mostly follows from the previous by a fixed rule."""

    def __init__(self, vocab_size: int, length: int = 1 << 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        rule = torch.randperm(vocab_size, generator=g).tolist()
        noise = torch.randint(vocab_size, (length,), generator=g).tolist()
        keep = (torch.rand(length, generator=g) < 0.9).tolist()
        tokens = [0]
        for i in range(1, length):
            tokens.append(rule[tokens[-1]] if keep[i] else noise[i])
        self.tokens = torch.tensor(tokens)

    def batch(self, batch_size: int, block_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Every rank draws the same global batch for a step; whale keeps each rank's rows.
        g = torch.Generator().manual_seed(1000 + step)
        starts = torch.randint(len(self.tokens) - block_size - 1, (batch_size,), generator=g)
        x = torch.stack([self.tokens[s : s + block_size] for s in starts])
        y = torch.stack([self.tokens[s + 1 : s + 1 + block_size] for s in starts])
        return x, y


def whale_target(batch: int = 16) -> tuple[GPT, tuple[torch.Tensor]]:
    """For ``whale plan examples/gpt.py``: the model and one global batch of inputs."""
    cfg = GPTConfig()
    x, _ = SyntheticCorpus(cfg.vocab_size, length=4 * cfg.block_size).batch(batch, cfg.block_size, 0)
    return GPT(cfg), (x,)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, then evaluate a held-out batch; the first and last training losses and that one."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--row-weights", type=str, default=None, help="e.g. 3,1")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--stages", type=int, default=1, help="pipeline stages (blocks split evenly)")
    p.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b or interleaved_1f1b")
    p.add_argument("--pipeline-degree", type=int, default=None, help="ranks per pipeline (interleaved)")
    args = p.parse_args(argv)

    info = wh.init()
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=args.block, n_layer=args.layers, n_head=args.heads, n_embd=args.embd)
    corpus = SyntheticCorpus(cfg.vocab_size)
    x, y = corpus.batch(args.batch, cfg.block_size, step=0)
    weights = [float(w) for w in args.row_weights.split(",")] if args.row_weights else None
    per_stage = args.layers / args.stages
    boundaries = [f"blocks.{round(k * per_stage)}" for k in range(1, args.stages)] or None
    model = wh.parallelize(
        GPT(cfg),
        loss_fn=lm_loss,
        example_inputs=(x,),
        config=wh.Config(
            num_micro_batch=args.micro_batches,
            row_weights=weights,
            stage_boundaries=boundaries,
            schedule=args.schedule,
            pipeline_degree=args.pipeline_degree,
        ),
    )
    if info.rank == 0:
        print(model.plan.table(args.batch))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    first = last = math.nan
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = corpus.batch(args.batch, cfg.block_size, step)
        loss = model.step(x, y).item()
        opt.step()
        opt.zero_grad()
        first = loss if step == 0 else first
        last = loss
        if info.rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            elapsed = time.perf_counter() - start
            tok_s = (step + 1) * args.batch * cfg.block_size / elapsed
            print(f"step {step:4d}  loss {loss:.4f}  {tok_s:,.0f} tokens/s (global)")
    if args.stages > 1:
        bubble = model.measured_bubble()  # collective: every rank calls it
        if info.rank == 0:
            print(f"measured pipeline bubble (last step): {bubble:.1%}")
    # A held-out batch, forward only (through the stages when pipelined; collective).
    x, y = corpus.batch(args.batch, cfg.block_size, step=10_000)
    with torch.no_grad():
        held_out = lm_loss(model.eval()(x), y).item()
    model.train()
    if info.rank == 0:
        print(f"loss {first:.3f} -> {last:.3f} over {args.steps} steps on {info.world_size} ranks; "
              f"held-out batch {held_out:.3f}")
    return {"first": first, "last": last, "held_out": held_out}


if __name__ == "__main__":
    main()
