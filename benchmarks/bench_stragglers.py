"""How long two data-parallel replicas wait for each other, measured against the cost model's
expected maximum (``whale.planner.cost.stragglers``).

On 2 gloo ranks (1 torch thread each) whale trains the same GPT data parallel with equal rows,
and every step each rank records its busy time (forward and backward, from
``program.timeline()``) after a barrier. Printed per row count:
- each rank's mean busy time and its spread from step to step (standard deviation over mean,
  and the robust spread ``profile_fields.spread`` that ``whale profile`` measures with),
- the largest of the two means (what a cost model without the wait predicts),
- the mean of the later rank's busy time, step by step (the sampled ``E[max]``),
- the expected maximum of two independent normal times with those means and spreads (what the
  cost model computes, given the right spread), and the correlation of the ranks' times;
- then the spread ``whale profile --quick`` measures on this host, from the same block runs it
  uses (``class_probe.block_times``, 15 runs), three times.

Run::

    python benchmarks/bench_stragglers.py
    python benchmarks/bench_stragglers.py --rows 8 24 48 --steps 60
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

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from whale.ir.profile_fields import spread
from whale.planner.class_probe import block_shape, block_times
from whale.planner.cost.stragglers import expected_max

_WARMUP = 8


def _worker(rank: int, world: int, args, results) -> None:
    cfg = GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=64)
    out = []
    for rows in args.rows:
        torch.manual_seed(0)
        x, y = SyntheticCorpus(cfg.vocab_size).batch(world * rows, cfg.block_size, 0)
        program = wh.parallelize(GPT(cfg), loss_fn=lm_loss, example_inputs=(x,), config=wh.Config(cluster=f"{world}xCPU"))
        opt = torch.optim.AdamW(program.parameters(), lr=1e-3)
        busy = []
        for step in range(_WARMUP + args.steps):
            dist.barrier()
            program.step(x, y)
            opt.step()
            opt.zero_grad()
            if step >= _WARMUP:
                busy.append(sum(e.duration for e in program.timeline().events
                                if e.rank == rank and e.category in ("forward", "backward")))  # fmt: skip
        gathered = [None] * world
        dist.all_gather_object(gathered, busy)
        out.append((rows, gathered))
    if rank == 0:
        results.put(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[8, 24], help="rows per rank")
    p.add_argument("--steps", type=int, default=42, help="timed steps per row count")
    args = p.parse_args()
    found = run_on_ranks(_worker, args, world=2, threads=1)
    print(f"GPT 4x128, 64 tokens, 2 gloo ranks x 1 thread, data parallel with equal rows; {args.steps} steps")
    for rows, (b0, b1) in found:
        m0, m1 = statistics.fmean(b0), statistics.fmean(b1)
        s0, s1 = statistics.pstdev(b0), statistics.pstdev(b1)
        sampled = statistics.fmean(max(a, b) for a, b in zip(b0, b1, strict=True))
        normal = expected_max([(m0, s0, 1), (m1, s1, 1)])
        print(f"rows {rows}: busy {m0 * 1e3:.1f} / {m1 * 1e3:.1f} ms, spread {s0 / m0:.1%} / {s1 / m1:.1%} "
              f"(robust {spread(b0):.1%} / {spread(b1):.1%}); largest mean {max(m0, m1) * 1e3:.1f} ms, "
              f"E[max] sampled {sampled * 1e3:.1f} ms, normal model {normal * 1e3:.1f} ms; "
              f"correlation {statistics.correlation(b0, b1):.2f}")
    torch.set_num_threads(1)
    readings = [spread(block_times("cpu", time.thread_time, shape=block_shape(False, True), dtype=torch.float32, repeat=15))
                for _ in range(3)]  # fmt: skip
    print("whale profile's block spread here: " + ", ".join(f"{r:.1%}" for r in readings))


if __name__ == "__main__":
    main()
