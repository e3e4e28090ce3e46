"""``Config(cluster="auto")`` on 2 gloo ranks, rank 1 emulated ``--factor`` times slower
(``WHALE_EMULATE_SLOWDOWN="1:FACTOR"``): what the self-profile measures, the rows it gives, and
the step time of that plan against even rows.

1. The self-profile (``whale.planner.self_profile.rank_report``) on both ranks at once,
   ``--measures`` times: rank 0's speed over rank 1's (the factor, ideally) and the seconds each
   measurement took.
2. One program under ``Config(cluster="auto")`` (data parallel GPT, rows that minimise the cost
   model's step time on the measured cluster) and one with even rows (``Config()``), trained in
   alternating rounds (auto, even, auto, even, ...) so that drift of the machine hits both
   alike; the printed ratio is even's step time over auto's in the same round. The ideal for a
   factor f is (f + 1) / 2 when every part of a step is f times slower on the slow rank: even
   rows make the slow rank take f x n/2, the best rows make both take f n / (f + 1).

Run (spawns its own 2 processes)::

    python benchmarks/bench_auto_cluster.py
    python benchmarks/bench_auto_cluster.py --factor 3 --rounds 7 --batch 48
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import run_on_ranks, seconds_per_step

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from whale.planner.self_profile import rank_report


def _worker(rank: int, world: int, args: argparse.Namespace, results) -> None:
    reports = []
    for _ in range(args.measures):
        dist.barrier()
        reports.append(rank_report(rank))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, [(r.speed, r.seconds) for r in reports])
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block)
    corpus = SyntheticCorpus(cfg.vocab_size)
    batches = [corpus.batch(args.batch, cfg.block_size, s) for s in range(args.warmup + args.steps)]
    programs = {}
    for name, config in (("auto", wh.Config(cluster="auto", quiet=True)), ("even", wh.Config())):
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):
            program = wh.parallelize(GPT(cfg), loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
        programs[name] = (program, torch.optim.AdamW(program.parameters(), lr=1e-3))
    times = {"auto": [], "even": []}
    for _ in range(args.rounds):
        for name, (program, opt) in programs.items():
            times[name].append(seconds_per_step(program.step, opt, batches, args.warmup))
    if rank == 0:
        auto = programs["auto"][0]
        results.put((gathered, list(auto.plan.rows(args.batch)), str(auto.config.cluster), times))


def main() -> None:
    p = argparse.ArgumentParser(description="cluster='auto' against even rows, rank 1 emulated slower, 2 gloo ranks")
    p.add_argument("--factor", type=float, default=2.0, help="rank 1's emulated slowdown")
    p.add_argument("--measures", type=int, default=5, help="self-profiles per rank")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    args = p.parse_args()
    os.environ["WHALE_EMULATE_SLOWDOWN"] = f"1:{args.factor:g}"  # the spawned ranks inherit it
    gathered, rows, cluster, times = run_on_ranks(_worker, args, world=2, threads=1)
    ratios = [s0 / s1 for (s0, _), (s1, _) in zip(gathered[0], gathered[1], strict=True)]
    took = [t for rank in gathered for _, t in rank]
    print(f"rank 1 emulated {args.factor:g}x slower; self-profile x{args.measures} on both ranks at once")
    print(f"measured speed ratio rank0/rank1: min {min(ratios):.2f}  median {statistics.median(ratios):.2f}  "
          f"max {max(ratios):.2f} (emulated {args.factor:g}); one measurement took at most {max(took):.2f} s")
    print(f"cluster='auto' planned {cluster}: rows {rows} of {args.batch} "
          f"(speed alone: {args.batch * args.factor / (args.factor + 1):.1f} on rank 0; the cost model adds the fixed "
          "per-step costs, which the slow rank pays slowly too)")
    step = [e / a for a, e in zip(times["auto"], times["even"], strict=True)]
    print(f"{'round':>5}  {'auto ms':>8}  {'even ms':>8}  {'even/auto':>9}")
    for i, (a, e, r) in enumerate(zip(times["auto"], times["even"], step, strict=True)):
        print(f"{i:>5}  {a * 1e3:>8.1f}  {e * 1e3:>8.1f}  {r:>9.3f}")
    print(f"step-time ratio even/auto: min {min(step):.3f}  median {statistics.median(step):.3f}  "
          f"max {max(step):.3f} (ideal {(args.factor + 1) / 2:.2f})")


if __name__ == "__main__":
    main()
