"""How much a gloo all-reduce started beside a backward lengthens it, on CPU ranks.

The cost model takes a gradient all-reduce that runs during the backward as overlapped: free
up to the backward's end. On a CPU rank the all-reduce's copies and reductions run on the cores
the backward computes on. On 2 gloo ranks (1 torch thread each, ``--pin``: each on its own
core), per all-reduce size, alternating within each round:

- the GPT's backward alone (the baseline);
- the same backward with one all-reduce of that size started just before it (``async_op``);
- that all-reduce alone, after a little compute, as ``whale profile`` times a link.

Printed per rank and size: how much longer the backward took, the all-reduce's own time, and
their ratio (1: no overlap at all; 0: free). The anchor is the plain PyTorch backward measured
in the same run.

Run::

    python benchmarks/bench_overlap.py --pin
    python benchmarks/bench_overlap.py --pin --sizes 1048576 8388608 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import run_on_ranks

from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss


def _worker(rank: int, world: int, args, results) -> None:
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block)
    x, y = SyntheticCorpus(cfg.vocab_size).batch(args.rows, cfg.block_size, rank)
    torch.manual_seed(0)
    model = GPT(cfg)
    warm = torch.randn(256, 256)
    backward = {0: []} | {size: [] for size in args.sizes}
    alone = {size: [] for size in args.sizes}
    buffers = {size: torch.zeros(size // 4) for size in args.sizes}
    for step in range(args.warmup + args.steps):
        for size in backward:  # alternating: the baseline and every size in each round
            loss = lm_loss(model(x), y)
            dist.barrier()
            start = time.perf_counter()
            work = dist.all_reduce(buffers[size], async_op=True) if size else None
            loss.backward()
            took = time.perf_counter() - start
            if work is not None:
                work.wait()
            model.zero_grad(set_to_none=True)
            if size:
                for _ in range(3):
                    warm @ warm  # the all-reduce follows compute, as in training
                dist.barrier()
                begin = time.perf_counter()
                dist.all_reduce(buffers[size])
                if step >= args.warmup:
                    alone[size].append(time.perf_counter() - begin)
            if step >= args.warmup:
                backward[size].append(took)
    mine = {size: statistics.median(times) for size, times in backward.items()}
    mine |= {("alone", size): statistics.mean(times) for size, times in alone.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        results.put(gathered)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1 << 18, 1 << 20, 1 << 22, 1 << 23], help="bytes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--pin", action="store_true", help="rank r on core r only")
    args = p.parse_args()
    ranks = run_on_ranks(_worker, args, pin=args.pin)
    print(f"backward beside one gloo all-reduce, 2 ranks x 1 thread{' (pinned)' if args.pin else ''}, "
          f"torch {torch.__version__}; GPT {args.layers} x {args.embd}, {args.rows} rows x {args.block} tokens")  # fmt: skip
    print("rank  all-reduce   backward ms   longer by ms   all-reduce alone ms   ratio")
    for rank, times in enumerate(ranks):
        base = times[0]
        print(f"{rank:4}  {'none':>10}  {base * 1e3:12.1f}")
        for size in args.sizes:
            longer, own = times[size] - base, times[("alone", size)]
            print(f"{rank:4}  {size >> 10:>6} KiB  {times[size] * 1e3:12.1f}  {longer * 1e3:13.2f}  "
                  f"{own * 1e3:20.2f}  {longer / own:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
