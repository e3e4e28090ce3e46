"""Predicted against measured step times: the cost model, calibrated by ``whale profile``, on this host.

On 2 gloo ranks (1 torch thread each) this profiles the host as ``whale profile --quick`` does,
every rank at once (matmul efficiency by size, cost per operation, memory bandwidth over buffers
larger than the last-level cache, optimizer steps, how linear, attention, elementwise and view
nodes run in a transformer block, the all-reduce link), in thread CPU time: the core's own rates. It then trains small GPTs under several plans, in rounds interleaved across
plans. During each run of a plan every rank measures the share of a core it got while it could
run (``measure.run_queue_share``, from the kernel's scheduler statistics: other jobs share this
host and their load drifts; time a rank waits for a message or sleeps does not count), and the
cost model predicts the plan that runs (``plan_cost.predict_plan``, as ``parallelize`` does) on
a cluster of the profile at each rank's share (``measure.slowed``). Printed: the median prediction against the
median wall time of a whole step (``step``, AdamW ``step``, ``zero_grad``) after warm-up.

Plans: data parallel, a 2-stage pipeline (1F1B), tensor parallel (the blocks ``split``), data
parallel with 4 micro-batches (gradient accumulation), a GPipe pipeline of 4 micro-batches, and
data parallel with rank 1 emulated at half speed (``WHALE_EMULATE_SLOWDOWN=1:2``; its cluster
gives rank 1 the host profile at half the rates), and on 4 ranks the mixed plan: 2 data-parallel
replicas of a 2-stage 1F1B pipeline (4 processes share the 2 cores; they profile the host again).

Run (spawns 2, then 4 processes; about 3 minutes)::

    python benchmarks/bench_predict.py
    python benchmarks/bench_predict.py --rounds 5 --steps 6 --case data --case pipeline
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import run_on_ranks

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from whale.capture import capture
from whale.ir.cluster_spec import parse_cluster
from whale.planner.cost.model_profile import profile_model
from whale.planner.cost.plan_cost import predict_plan
from whale.planner.measure import (
    cpu_share,
    measure_device,
    measure_links,
    run_queue_clock,
    run_queue_share,
    slowed,
)

_SLOWDOWN = "WHALE_EMULATE_SLOWDOWN"
CASES = ("data", "pipeline", "tensor", "data-accum", "pipeline-gpipe", "emulated-slow", "mixed")
# Plans on 4 ranks (2 data-parallel replicas of a 2-stage pipeline); the rest run on 2.
FOUR_RANKS = ("mixed",)


def emulation_supported() -> bool:
    """The runtime applies ``WHALE_EMULATE_SLOWDOWN`` (whale.runtime.emulate exists)."""
    return importlib.util.find_spec("whale.runtime.emulate") is not None


def _cluster(name: str, host, link: str, world: int):
    """The cluster a plan runs on: ``world`` ranks of ``host`` (rank 1 at half speed when emulated)."""
    if name != "emulated-slow":
        return parse_cluster(f"node0={world}x{host.name}({link})", profiles=[host])
    slow = slowed(host, 2.0, "CPU-half")
    return parse_cluster(
        f"node0=1x{host.name}+1x{slow.name}({link})", profiles=[host, slow]
    )


def _case(name: str, args, host, link: str, world: int):
    """(model, config) of one plan; the config's cluster is the measured host."""
    cfg = GPTConfig(
        n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    config = {"cluster": _cluster(name, host, link, world)}
    boundary = [f"blocks.{args.layers // 2}"]
    if name == "data-accum":
        config.update(num_micro_batch=4)
    elif name == "pipeline" or name == "mixed":
        config.update(stage_boundaries=boundary, num_micro_batch=4)
    elif name == "pipeline-gpipe":
        config.update(stage_boundaries=boundary, num_micro_batch=4, schedule="gpipe")
    elif name == "tensor":
        wh.annotate(model, {f"blocks.{k}": wh.split() for k in range(args.layers)})
    elif name not in ("data", "emulated-slow"):
        raise ValueError(f"unknown case {name!r}; use one of {list(CASES)}")
    return model, wh.Config(**config)


def rank_cluster(name: str, host, link: str, shares):
    """The cluster a run is predicted on: rank ``r`` is the host at ``shares[r]`` of a core
    (and, in the emulated plan, rank 1 at half speed besides)."""
    devices = {}
    for rank, share in enumerate(shares):
        device = slowed(host, 2.0, "CPU-half") if name == "emulated-slow" and rank == 1 else host
        devices[rank] = slowed(device, 1 / share, f"{device.name}-r{rank}")
    spec = "+".join(f"1x{d.name}" for d in devices.values())
    return parse_cluster(f"node0={spec}({link})", profiles=list(devices.values()))


def _shares(world: int, before, fallback: float) -> list[float]:
    """Each rank's share of a core while its steps could run (scheduler statistics since
    ``before``: time sleeping or waiting for a message is not counted); where the system keeps
    none, the share measured before the run (``fallback``)."""
    share = run_queue_share(before, run_queue_clock())
    gathered = [None] * world
    dist.all_gather_object(gathered, fallback if share is None else share)
    return gathered


def _worker(rank: int, world: int, args, results) -> None:
    ring = measure_links()["all_reduce"]
    link = f"intra={ring.bandwidth / 1e9:.4g}GB/s,intra_lat={ring.latency * 1e6:.4g}us"
    # The core's own rates (thread CPU time) and the link, measured by every rank at once; rank
    # 0's serve every rank, so all build one Config (whale checks that they agree).
    gathered = [None] * world
    dist.all_gather_object(gathered, (measure_device(quick=True, share=1.0), link))
    host, link = gathered[0]
    cfg = GPTConfig(
        n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block
    )
    x, y = SyntheticCorpus(cfg.vocab_size).batch(args.batch, cfg.block_size, 0)
    runs = {}
    for name in args.case or CASES:
        if (name in FOUR_RANKS) != (world == 4):
            continue
        if name == "emulated-slow" and not emulation_supported():
            continue
        model, config = _case(name, args, host, link, world)
        if name == "emulated-slow":
            os.environ[_SLOWDOWN] = "1:2"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = wh.parallelize(
                    model, loss_fn=lm_loss, example_inputs=(x,), config=config
                )
        finally:
            os.environ.pop(_SLOWDOWN, None)
        layers = profile_model(capture(_case(name, args, host, link, world)[0], (x,)), args.batch,
                               boundaries=program.plan.stage_boundaries)  # fmt: skip
        opt = torch.optim.AdamW(program.parameters(), lr=1e-3)
        runs[name] = (program, opt, layers, [], [])
    for _ in range(args.rounds):
        for name, (program, opt, layers, times, predicted) in runs.items():
            # Other jobs' load drifts: each run is predicted at the share of a core every rank
            # got during its own timed steps (before them where the system cannot say).
            fallback = cpu_share(0.4) if run_queue_clock() is None else 1.0
            dist.barrier()
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    before = run_queue_clock()
                start = time.perf_counter()
                program.step(x, y)
                opt.step()
                opt.zero_grad()
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
            shares = _shares(world, before, fallback)
            cluster = rank_cluster(name, host, link, shares)
            predicted.append((shares, predict_plan(program.plan, layers, cluster, args.batch).prediction.step_time))
    if rank == 0:
        rows = [
            (
                n,
                statistics.median(v for _, v in p),
                statistics.median(t),
                statistics.median(statistics.fmean(s) for s, _ in p),
            )
            for n, (_, _, _, t, p) in runs.items()
        ]
        record = {
            n: (r[0].plan.to_json(), [share for share, _ in r[4]], host, ring)
            for n, r in runs.items()
        }
        results.put((host, ring, rows, record))


def main() -> None:
    p = argparse.ArgumentParser(
        description="predicted vs measured step times on this host, 2 gloo ranks"
    )
    p.add_argument(
        "--case", choices=CASES, action="append", help="plans to run (default: all)"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--record", help="write the profile, plans and measured times to this JSON file"
    )
    args = p.parse_args()
    start = time.perf_counter()
    chosen = args.case or CASES
    rows, record = [], {}
    for world in (2, 4):
        if not any((name in FOUR_RANKS) == (world == 4) for name in chosen):
            continue
        # Each world profiles the host again: the rates a rank gets depend on how many run.
        got_host, got_ring, got_rows, got_record = run_on_ranks(_worker, args, world=world, threads=1)
        if world == 2 or not rows:
            host, ring = got_host, got_ring
        rows += got_rows
        record.update(got_record)
    print(
        f"predicted vs measured step time, gloo ranks x 1 thread (2; mixed: 4), torch {torch.__version__}"
    )
    print(f"GPT {args.layers} layers x {args.embd} wide, {args.heads} heads, {args.block} tokens, "
          f"global batch {args.batch}; median of {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    print(f"host profile: {host.peak('fp32') / 1e9:.0f} GFLOP/s fp32, {host.memory_bandwidth / 1e9:.1f} GB/s, "
          f"{host.overhead() * 1e6:.1f} us per op; all-reduce link {ring.describe()}")  # fmt: skip
    print(
        f"{'plan':16} {'core share':>10} {'predicted ms':>12} {'measured ms':>12} {'error':>8}"
    )
    errors = []
    for name, predicted, measured, share in rows:
        error = predicted / measured - 1
        errors.append(abs(error))
        print(
            f"{name:16} {share:10.0%} {predicted * 1e3:12.1f} {measured * 1e3:12.1f} {error:+8.1%}"
        )
    if not emulation_supported():
        print(f"emulated-slow: skipped, the runtime does not apply {_SLOWDOWN} yet")
    if errors:
        print(
            f"median |error| {statistics.median(errors):.1%} over {len(errors)} plans (goal <= 15%)"
        )
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.record:
        out = {
            "command": "python benchmarks/bench_predict.py " + " ".join(sys.argv[1:]),
            "model": {"n_layer": args.layers, "n_embd": args.embd, "n_head": args.heads, "block_size": args.block},
            "batch": args.batch, "profile": host.to_dict(), "link": [ring.bandwidth, ring.latency],
            "cases": {n: {"plan": json.loads(record[n][0]), "shares": record[n][1], "measured": m, "predicted": pr,
                          # the profile and link its own world measured, where that is not the 2 ranks'
                          **({"profile": record[n][2].to_dict(), "link": [record[n][3].bandwidth, record[n][3].latency]}
                             if n in FOUR_RANKS else {})}
                      for n, pr, m, _ in rows},
        }  # fmt: skip
        with open(args.record, "w", encoding="utf-8") as file:
            json.dump(out, file, indent=1)
            file.write("\n")


if __name__ == "__main__":
    main()
