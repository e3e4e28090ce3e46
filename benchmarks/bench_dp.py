"""Data parallel: whale ``replicate`` against ``torch.nn.parallel.DistributedDataParallel``.

The same GPT, the same global batches and the same initial weights are trained by both, on 2
gloo ranks, in alternating rounds (whale, DDP, whale, DDP, ...) so that drift of the machine
hits both alike. Each round times ``--steps`` steps after ``--warmup`` steps; the printed ratio
is whale's throughput over DDP's in the same round, with min/median/max over rounds.

Run (spawns its own 2 processes)::

    python benchmarks/bench_dp.py
    python benchmarks/bench_dp.py --rounds 7 --steps 20 --layers 6 --embd 384
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import whale as wh  # noqa: E402
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss  # noqa: E402
from _launch import run_on_ranks, seconds_per_step  # noqa: E402



def _worker(rank: int, world: int, args: argparse.Namespace, results) -> None:
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block)
    corpus = SyntheticCorpus(cfg.vocab_size)
    n = args.warmup + args.steps
    batches = [corpus.batch(args.batch, cfg.block_size, s) for s in range(n)]
    torch.manual_seed(0)
    config = wh.Config(bucket_cap_mb=args.bucket_mb) if args.bucket_mb else None
    whale_model = wh.parallelize(GPT(cfg), loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    whale_opt = torch.optim.AdamW(whale_model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    ddp_model = torch.nn.parallel.DistributedDataParallel(GPT(cfg))
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3)
    rows = args.batch // world

    def ddp_step(x, y):
        mine = slice(rank * rows, (rank + 1) * rows)
        lm_loss(ddp_model(x[mine]), y[mine]).backward()

    ratios, whale_s, ddp_s = [], [], []
    for _ in range(args.rounds):
        w = seconds_per_step(whale_model.step, whale_opt, batches, args.warmup)
        d = seconds_per_step(ddp_step, ddp_opt, batches, args.warmup)
        whale_s.append(w)
        ddp_s.append(d)
        ratios.append(d / w)  # throughput ratio = inverse time ratio
    if rank == 0:
        results.put((ratios, whale_s, ddp_s))


def main() -> None:
    p = argparse.ArgumentParser(description="whale replicate vs DDP throughput, 2 gloo ranks")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--bucket-mb", type=float, default=None, help="whale's bucket cap (default: Config's)")
    args = p.parse_args()
    world = 2
    ratios, whale_s, ddp_s = run_on_ranks(_worker, args, world=world, threads=args.threads)
    tok = args.batch * args.block
    print(f"GPT {args.layers}x{args.embd}, global batch {args.batch}x{args.block}, {world} gloo ranks, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'round':>5}  {'whale tok/s':>12}  {'DDP tok/s':>12}  {'ratio':>6}")
    for i, (w, d, r) in enumerate(zip(whale_s, ddp_s, ratios)):
        print(f"{i:>5}  {tok / w:>12,.0f}  {tok / d:>12,.0f}  {r:>6.3f}")
    print(f"throughput ratio whale/DDP: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  "
          f"max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
