"""Predicted against measured step times: the cost model, calibrated by ``whale profile``, on this host.

On 2 gloo ranks (1 torch thread each) this profiles the host as ``whale profile --quick`` does,
every rank at once (matmul efficiency by size, cost per operation, memory bandwidth over buffers
larger than the last-level cache, optimizer steps, how linear, attention, elementwise and view
nodes run in a transformer block, the all-reduce link), in thread CPU time: the core's own rates. It then trains small GPTs under several plans, in rounds interleaved across
plans. During each run of a plan every rank measures the share of a core it got while it could
run (``measure.run_queue_share``, from the kernel's scheduler statistics: other jobs share this
host and their load drifts; time a rank waits for a message or sleeps does not count), and the
cost model predicts the plan that runs (``plan_cost.predict_plan``, as ``parallelize`` does) on
a cluster of the profile at each rank's share (``measure.slowed``). With ``--pace`` also at its
CPU pace: the thread CPU time of a reference transformer block (``class_probe.block_seconds``)
right after the run over the same while the host was profiled (the median of three: before,
between and after the link and device measurements); on a CPU shared with other jobs the same
work takes more CPU when they crowd its caches and cores, which the share, counting only the
time they take the core away, misses (the reference swung 7-13 ms within a minute at load
average 5), but it read 0.61-0.71 after 4 of 5 loaded runs, steadily, for a cause not found,
so it is off by default. The ranks run with glibc's mmap threshold fixed (``--default-malloc``
leaves it): its dynamic threshold made the same block take 7.4-11.2 ms of CPU in one process
by what the process had freed before (fresh, page-faulting memory), 7.4-7.9 ms fixed. Printed:
the median prediction against the median wall time of a whole step (``step``, AdamW ``step``,
``zero_grad``) after warm-up.

Plans: data parallel, a 2-stage pipeline (1F1B), tensor parallel (the blocks ``split``), data
parallel with 4 micro-batches (gradient accumulation), a GPipe pipeline of 4 micro-batches, and
data parallel with rank 1 emulated at half speed (``WHALE_EMULATE_SLOWDOWN=1:2``; predicted
with rank 1's compute at half the rates and twice the cost per operation and per optimizer
step, as the emulation stretches both), and on 4 ranks the mixed plan: 2
data-parallel replicas of a 2-stage 1F1B pipeline (4 processes share the 2 cores; they profile
the host again).

``--pin`` runs rank r on core r only (as a GPU job's rank has its own device). Unpinned on this
2-core host, a gloo all-reduce sometimes completes on one rank a scheduler tick after the other
(exit skew 2-5 ms in a quarter of tensor parallel's all-reduces, mean 1.1 ms; pinned 0.05 ms),
which no link measurement sees. ``--profiles N`` profiles the host N times in a row and predicts
each plan at the median of them: one quick profile's class factors moved by up to 40% between
consecutive profiles, while the same plan's measured step held within 3%. ``--reprofile``
profiles again before every round and predicts the round's steps from those profiles, as a job
that measures its ranks when it starts (``Config(cluster="auto")``) runs right after its
profile; printed beside the error from the profiles taken before the first round. ``--full``
takes full profiles (matmuls up to 3072 x 768 x 3072, as ``whale profile``) instead of quick ones.

Run (spawns 2, then 4 processes; about 3 minutes)::

    python benchmarks/bench_predict.py
    python benchmarks/bench_predict.py --rounds 5 --steps 6 --case data --case pipeline
    python benchmarks/bench_predict.py --pin --profiles 5
    python benchmarks/bench_predict.py --pin --profiles 5 --reprofile
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

from _launch import HostLoad, run_on_ranks

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from whale.capture import capture
from whale.ir.cluster_spec import parse_cluster
from whale.planner.class_probe import block_seconds, block_shape
from whale.planner.cost.model_profile import profile_model
from whale.planner.cost.plan_cost import predict_plan
from whale.planner.link_probe import measure_links
from whale.planner.measure import (
    cpu_share,
    emulated,
    measure_device,
    run_queue_clock,
    run_queue_share,
    slowed,
)

_SLOWDOWN = "WHALE_EMULATE_SLOWDOWN"
_EMULATION = {_SLOWDOWN: "1:2"}  # the emulated-slow plan: rank 1 at half speed
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
    slow = emulated(host, 1, _EMULATION)
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


def rank_cluster(name: str, host, link: str, shares, paces=None):
    """The cluster a run is predicted on: rank ``r`` is the host at ``shares[r]`` of a core,
    each of its seconds of CPU doing the work of ``1 / paces[r]`` (and, in the emulated plan,
    each rank as ``WHALE_EMULATE_SLOWDOWN`` runs it besides: forward, backward and the optimizer
    step stretched, :func:`~whale.planner.measure.emulated`)."""
    devices = {}
    for rank, share in enumerate(shares):
        device = emulated(host, rank, _EMULATION) if name == "emulated-slow" else host
        pace = paces[rank] if paces is not None else 1.0
        devices[rank] = slowed(device, pace / share, f"{device.name}-r{rank}")
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


def _reference() -> float:
    """Thread CPU seconds of the reference block (:func:`~whale.planner.class_probe.block_seconds`)."""
    return block_seconds("cpu", time.thread_time, shape=block_shape(False, True), dtype=torch.float32)


def _paces(world: int, reference: float) -> list[float]:
    """Each rank's reference block now over at profiling, in thread CPU time: how much more CPU
    the same work takes now that other jobs share the caches and cores (the share of a core
    counts only the time they take it away)."""
    gathered = [None] * world
    dist.all_gather_object(gathered, _reference() / reference)
    return gathered


def _profiles(world: int, count: int, quick: bool = True) -> list:
    """``count`` profiles in a row (quick ones: ``whale profile --quick``), every rank measuring
    at once: rank 0's."""
    hosts = []
    for _ in range(count):
        gathered = [None] * world
        dist.all_gather_object(gathered, measure_device(quick=quick, share=1.0))
        hosts.append(gathered[0])
    return hosts


def _by_category(timeline, rank: int) -> dict[str, float]:
    """Seconds ``rank`` spent in each category of ``timeline`` (forward, backward, send, ...)."""
    out: dict[str, float] = {}
    for event in timeline.events:
        if event.rank == rank:
            out[event.category] = out.get(event.category, 0.0) + event.duration
    return out


def _median_of(dicts) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: statistics.median(d.get(k, 0.0) for d in dicts) for k in keys}


def print_phases(phases: dict[str, list]) -> None:
    """Per plan and rank: measured / predicted milliseconds in each phase."""
    print("phases, measured / predicted ms per step (predicted sync spans from the last backward's "
          "start, which it overlaps; measured send/recv are the posting of transfers):")  # fmt: skip
    for name, ranks in phases.items():
        for rank, (measured, predicted) in enumerate(ranks):
            cells = [f"{k} {measured.get(k, 0.0) * 1e3:.1f} / {predicted.get(k, 0.0) * 1e3:.1f}"
                     for k in ("forward", "backward", "send", "recv", "sync", "optimizer")
                     if measured.get(k) or predicted.get(k)]  # fmt: skip
            print(f"  {name:16} rank {rank}: " + ", ".join(cells))


def _median_estimate(plan, layers, clusters, batch: int):
    """:func:`predict_plan` on each of ``clusters`` (one per profile): the median by step time."""
    estimates = sorted((predict_plan(plan, layers, c, batch) for c in clusters), key=lambda e: e.prediction.step_time)
    return estimates[(len(estimates) - 1) // 2]


def _worker(rank: int, world: int, args, results) -> None:
    # The reference block's pace while the host is profiled: before, between and after the
    # link and device measurements (every rank at once, as they profile), the median.
    references = [_reference()]
    ring = measure_links()["all_reduce"]
    references.append(_reference())
    link = f"intra={ring.bandwidth / 1e9:.4g}GB/s,intra_lat={ring.latency * 1e6:.4g}us"
    # The core's own rates (thread CPU time) and the link, measured by every rank at once; rank
    # 0's serve every rank, so all build one Config (whale checks that they agree).
    # With --profiles N, N profiles in a row: each plan is predicted on each, and the median
    # prediction is taken (one quick profile reads this host's rates within a second or two).
    gathered = [None] * world
    dist.all_gather_object(gathered, link)
    link = gathered[0]
    hosts = _profiles(world, args.profiles, not args.full)
    host = hosts[0]
    reference = statistics.median([*references, _reference()])
    cfg = GPTConfig(
        n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block
    )
    x, y = SyntheticCorpus(cfg.vocab_size).batch(args.batch, cfg.block_size, 0)
    runs, phases = {}, {}
    for name in args.case or CASES:
        if (name in FOUR_RANKS) != (world == 4):
            continue
        if name == "emulated-slow" and not emulation_supported():
            continue
        model, config = _case(name, args, host, link, world)
        if name == "emulated-slow":
            os.environ.update(_EMULATION)
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
        phases[name] = ([], [])  # measured per step, predicted per run: {category: seconds} of this rank
    started = hosts  # the profiles taken before the plans were built
    for _ in range(args.rounds):
        if args.reprofile:  # as a job that profiles its ranks when it starts, right before its steps
            hosts = _profiles(world, args.profiles, not args.full)
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
                stepped = time.perf_counter()
                opt.step()
                opt.zero_grad()
                done = time.perf_counter()
                if step >= args.warmup:
                    times.append(done - start)
                    if args.phases:  # a collective: it lines the ranks up before the next step
                        spent = _by_category(program.timeline(), rank)
                        spent["optimizer"] = done - stepped
                        phases[name][0].append(spent)
            shares = _shares(world, before, fallback)
            paces = _paces(world, reference) if args.pace else None
            estimate = _median_estimate(program.plan, layers, [rank_cluster(name, h, link, shares, paces) for h in hosts], args.batch)
            # With --pace, also the prediction without it: the two compare on the same steps.
            unpaced = estimate if paces is None else _median_estimate(
                program.plan, layers, [rank_cluster(name, h, link, shares, None) for h in hosts], args.batch)
            if args.reprofile:  # the same steps predicted from the first profiles instead
                unpaced = _median_estimate(
                    program.plan, layers, [rank_cluster(name, h, link, shares, paces) for h in started], args.batch)
            predicted.append((shares, estimate.prediction.step_time, paces, unpaced.prediction.step_time))
            phases[name][1].append(_by_category(estimate.timeline, rank))
    mine = {n: tuple(_median_of(v) for v in both) for n, both in phases.items()} if args.phases else {}
    by_rank = [None] * world
    dist.all_gather_object(by_rank, mine)
    if rank == 0:
        rows = [
            (
                n,
                statistics.median(v for _, v, _, _ in p),
                statistics.median(t),
                statistics.median(statistics.fmean(s) for s, _, _, _ in p),
                statistics.median(statistics.fmean(c) if c else 1.0 for _, _, c, _ in p),
                statistics.median(u for _, _, _, u in p),
            )
            for n, (_, _, _, t, p) in runs.items()
        ]
        record = {
            n: (r[0].plan.to_json(), [share for share, _, _, _ in r[4]], host, ring, [c for _, _, c, _ in r[4]])
            for n, r in runs.items()
        }
        results.put((host, ring, rows, record, by_rank))


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
        "--default-malloc", dest="fixed_malloc", action="store_false",
        help="leave glibc's dynamic mmap threshold as it is (the ranks then allocate differently "
        "while profiling and training)",
    )
    p.add_argument(
        "--phases", action="store_true",
        help="also print each plan's forward, backward, transfers, sync and optimizer time per "
        "rank, measured (program.timeline(), a collective after each timed step) against predicted",
    )
    p.add_argument(
        "--pace", action="store_true",
        help="also predict each run at its CPU pace (the reference block's CPU time after the "
        "run over while profiling), printed beside the error without it (same steps)",
    )
    p.add_argument(
        "--profiles", type=int, default=1,
        help="profile the host this many times in a row and predict each plan at the median of them",
    )
    p.add_argument(
        "--reprofile", action="store_true",
        help="profile the host again before every round and predict the round's steps from those "
        "profiles (as a job that profiles its ranks when it starts), printed beside the error "
        "from the profiles taken before the first round (same steps)",
    )
    p.add_argument(
        "--full", action="store_true",
        help="full profiles (as `whale profile`: matmuls up to 3072 x 768 x 3072, about 10 s each) "
        "instead of quick ones (up to 1024 x 256 x 1024)",
    )
    p.add_argument(
        "--pin", action="store_true",
        help="rank r runs on core r only (where there are as many cores as ranks)",
    )
    p.add_argument(
        "--record", help="write the profile, plans and measured times to this JSON file"
    )
    args = p.parse_args()
    if args.pace and args.reprofile:
        p.error("--pace and --reprofile each print a second error; choose one")
    if args.fixed_malloc:
        # glibc moves its mmap threshold as a process frees large blocks, so the same tensors
        # come from fresh, page-faulting mmap'd memory in one phase and from the heap in the
        # next; the ranks (spawned after this) profile and train alike with it fixed.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 30))
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))
    start, load = time.perf_counter(), HostLoad()
    chosen = args.case or CASES
    rows, record, phases = [], {}, {}
    for world in (2, 4):
        if not any((name in FOUR_RANKS) == (world == 4) for name in chosen):
            continue
        # Each world profiles the host again: the rates a rank gets depend on how many run.
        got_host, got_ring, got_rows, got_record, got_phases = run_on_ranks(_worker, args, world=world, threads=1, pin=args.pin)
        for name in got_rows:
            phases[name[0]] = [r[name[0]] for r in got_phases if name[0] in r]
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
    # The same steps predicted another way, beside the error: without the pace, or from the
    # profiles taken before the first round.
    other = "with no pace" if args.pace else "first profiles" if args.reprofile else None
    print(
        f"{'plan':16} {'core share':>10} {'CPU pace':>8} {'predicted ms':>12} {'measured ms':>12} {'error':>8}"
        + (f" {'error, ' + other:>21}" if other else "")
    )
    errors, plain_errors = [], []
    for name, predicted, measured, share, pace, plain in rows:
        error = predicted / measured - 1
        errors.append(abs(error))
        plain_errors.append(abs(plain / measured - 1))
        print(
            f"{name:16} {share:10.0%} {pace:8.2f} {predicted * 1e3:12.1f} {measured * 1e3:12.1f} {error:+8.1%}"
            + (f" {plain / measured - 1:+21.1%}" if other else "")
        )
    if not emulation_supported():
        print(f"emulated-slow: skipped, the runtime does not apply {_SLOWDOWN} yet")
    if errors:
        print(
            f"median |error| {statistics.median(errors):.1%} over {len(errors)} plans (goal <= 15%)"
            + (f"; {other} {statistics.median(plain_errors):.1%}" if other else "")
        )
    if args.phases:
        print_phases(phases)
    print(f"total {time.perf_counter() - start:.0f} s; {load.describe()}")
    if args.record:
        out = {
            "command": "python benchmarks/bench_predict.py " + " ".join(sys.argv[1:]),
            "model": {"n_layer": args.layers, "n_embd": args.embd, "n_head": args.heads, "block_size": args.block},
            "batch": args.batch, "profile": host.to_dict(), "link": [ring.bandwidth, ring.latency],
            "cases": {n: {"plan": json.loads(record[n][0]), "shares": record[n][1], "paces": record[n][4], "measured": m, "predicted": pr,
                          # the profile and link its own world measured, where that is not the 2 ranks'
                          **({"profile": record[n][2].to_dict(), "link": [record[n][3].bandwidth, record[n][3].latency]}
                             if n in FOUR_RANKS else {})}
                      for n, pr, m, _, _, _ in rows},
        }  # fmt: skip
        with open(args.record, "w", encoding="utf-8") as file:
            json.dump(out, file, indent=1)
            file.write("\n")


if __name__ == "__main__":
    main()
