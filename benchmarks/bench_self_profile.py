"""How steadily ``Config(cluster="auto")``'s self-profile reads an emulated slow rank.

On 2 gloo ranks (1 torch thread each) with rank 1 emulated ``--slow`` times slower
(``WHALE_EMULATE_SLOWDOWN``), every rank runs :func:`whale.planner.self_profile.rank_report`
``--repeats`` times at once, as ``parallelize`` does, and rank 0 reads the speed ratio of the
two reports each time. Rounds alternate the profile as it runs (each rank's samples taken on the
host's cores in turn, ``self_profile._rotation``) with the same profile left where the scheduler
puts it (no rotation), so both see the same minutes of the host. Printed per round: the median,
standard deviation and range of the readings; a reading near ``--slow`` with a small spread is
what the planner should be given.

Run::

    python benchmarks/bench_self_profile.py
    python benchmarks/bench_self_profile.py --rounds 4 --repeats 20 --slow 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import run_on_ranks

from whale.planner import self_profile


def _worker(rank: int, world: int, args, results) -> None:
    os.environ["WHALE_EMULATE_SLOWDOWN"] = f"1:{args.slow}"
    rotation = self_profile._rotation
    rounds = []
    for k in range(2 * args.rounds):
        rotated = k % 2 == 0
        self_profile._rotation = rotation if rotated else (lambda *a, **kw: [])
        readings = []
        for _ in range(args.repeats):
            dist.barrier()
            report = self_profile.rank_report(rank)
            speeds = [None] * world
            dist.all_gather_object(speeds, report.speed)
            readings.append(speeds[0] / speeds[1])
        rounds.append((rotated, readings))
    self_profile._rotation = rotation
    if rank == 0:
        results.put(rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of each kind, alternating")
    p.add_argument("--repeats", type=int, default=15, help="self-profiles per round")
    p.add_argument("--slow", type=float, default=2.0, help="rank 1 is this many times slower")
    args = p.parse_args()
    rounds = run_on_ranks(_worker, args, world=2, threads=1)
    print(f"self-profile reading of rank 1 emulated {args.slow:g}x slower, 2 gloo ranks x 1 thread, "
          f"{args.repeats} profiles per round")
    print(f"{'round':>5} {'cores':>10} {'median':>7} {'sd':>6} {'min':>6} {'max':>6}")
    for k, (rotated, readings) in enumerate(rounds):
        print(f"{k:>5} {'rotated' if rotated else 'scheduler':>10} {statistics.median(readings):7.2f} "
              f"{statistics.pstdev(readings):6.3f} {min(readings):6.2f} {max(readings):6.2f}")
    for rotated in (True, False):
        every = [x for r, readings in rounds if r == rotated for x in readings]
        print(f"all {'rotated' if rotated else 'scheduler'}: median {statistics.median(every):.2f}, "
              f"sd {statistics.pstdev(every):.3f}, {len(every)} readings")


if __name__ == "__main__":
    main()
