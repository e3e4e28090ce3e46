"""Heterogeneous devices: whale's planned split against the even one, and adaptive rows.

Two gloo ranks on this host; rank 1 behaves as a device ``--slow`` (2) times slower
(``WHALE_EMULATE_SLOWDOWN="1:2"``: its compute is stretched by sleeping, so it does not take the
CPU from rank 0). Each rank first measures itself (``whale.planner.measure.measure_device``,
which sees the emulated speed as a real one), the ranks exchange the profiles, and
:func:`planned_config` asks whale's planner for the split of that measured cluster. Then, in
alternating steps (planned, even, planned, ...):

* ``dp``: data parallel, ``Config(cluster="auto")`` (the ranks measure themselves when the
  program is made; the rows minimise the cost model's step time on that cluster: compute per
  row, and the per-operation and optimizer costs the slow rank also pays slowly) against even
  rows. The ideal bound is ``(s + 1) / 2`` for a device ``s`` times slower (1.5x for s = 2) when
  all of a step is slowed on the slow rank and none of it is shared: the even split waits
  ``s / 2`` for the slow rank's half, the best one ``s / (s + 1)``. The run also prints its own
  ideal (:func:`in_run_ideal`): the best split of the per-rank busy times it measured, with
  what no split shortens (gradient sync, the runtime's work between the pieces, barriers).
* ``pp``: a 2-stage pipeline (1F1B, ``--micro-batches``) cut where whale's search, pinned to 2
  stages on the 2 ranks, cuts it for the measured devices, against the even cut (half the
  blocks on each stage).
* ``adaptive``: ``Config(adaptive_rows=True)`` from even rows on two equal ranks; rank 1 slows
  down ``--slow`` times at step ``--slow-at``. Its steps alternate with those of the balanced
  program (the planned rows, slowed from the start); reported: the steps after the slowdown
  until the step-time ratio adaptive/balanced is within 10% and stays there (a running median
  of 3 steps).

Programs compared alternate step by step (each step, with its optimizer step, between two
barriers: the step lasts until the slowest rank is done), so the load of the host at any moment
weighs on both; every ratio is measured in the same run, and the host's load average is printed
with them. The model (a GPT of 4 blocks of 128, a batch of 48 x 64 tokens) is one whose step is
mostly compute that grows with rows, as a big batch's on real GPUs: the gradient sync (0.8 M
parameters through shared memory) is a few ms of a ~200 ms step; the runtime's own per-step work
is in every measured step.

Run (spawns its own 2 processes)::

    python benchmarks/bench_hetero.py
    python benchmarks/bench_hetero.py --parts dp,adaptive --rounds 7 --slow 3
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import HostLoad, run_on_ranks

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from whale.capture import capture
from whale.ir.cluster_spec import Cluster, parse_cluster
from whale.ir.devices import DeviceProfile
from whale.ir.emulation import ENV_VAR
from whale.ir.rows import split_rows
from whale.planner.measure import measure_device
from whale.planner.search.auto import auto_plan
from whale.planner.search.balance import rows_by_speed
from whale.planner.search.pins import Pins
from whale.runtime.adaptive.adaptive_rows import compute_seconds

_WITHIN = 1.10  # "balanced": within 10% of the balanced step time
_GOALS = {"dp": 1.3, "pp": 1.2}


def measured_cluster() -> tuple[Cluster, list[DeviceProfile]]:
    """Every rank measures its device (emulated slowdown included) and gets every rank's
    profile; the cluster has one node holding one device per rank, in rank order."""
    mine = measure_device(quick=True)
    profiles: list = [None] * dist.get_world_size()
    dist.all_gather_object(profiles, mine)
    named = [dataclasses.replace(p, name=f"rank{r}", aliases=()) for r, p in enumerate(profiles)]
    return parse_cluster("node0=" + "+".join(f"1x{p.name}" for p in named), profiles=named), named


def planned_config(kind: str, model, example, cluster: Cluster, profiles, args) -> wh.Config:
    """The split whale plans for the measured cluster: ``kind`` ``"dp"`` gives rows in proportion
    to the measured speeds (``Config(cluster="auto")``: the ranks measure themselves when the
    program is made), ``"pp"`` the cut of whale's search pinned to 2 stages on the 2 ranks."""
    if kind == "dp":  # the ranks measure themselves again at parallelize and plan the rows
        return wh.Config(cluster="auto", quiet=True)
    captured = capture(model, (example,))
    config = wh.Config(auto_parallel=True, cluster=cluster, pipeline_degree=2, num_micro_batch=args.micro_batches)
    pins = Pins(num_stages=2, schedule="1f1b")
    plan, _ = auto_plan(captured, {}, 2, config, cluster=cluster, global_batch=args.batch, extra_pins=pins)
    if plan.pipelines != ((0, 1),):
        print(f"note: the plan orders the ranks {plan.pipelines}; the bench runs stage 0 on rank 0", flush=True)
    return wh.Config(stage_boundaries=plan.stage_boundaries, num_micro_batch=args.micro_batches)


def _program(cfg: GPTConfig, example, config: wh.Config, spec: str):
    os.environ[ENV_VAR] = spec  # read when the program is made
    try:
        torch.manual_seed(0)
        program = wh.parallelize(GPT(cfg), loss_fn=lm_loss, example_inputs=(example,), config=config)
    finally:
        del os.environ[ENV_VAR]
    return program, torch.optim.AdamW(program.parameters(), lr=1e-3)


def _alternate(programs: dict, batches) -> dict[str, list[tuple[float, float, float]]]:
    """Each batch stepped by every program in turn (step, optimizer step), each step between
    two barriers: per program and step, this rank's ``(step seconds, compute seconds,
    optimizer seconds)``. The step lasts from the barrier before it to the barrier after it,
    so it counts every rank's work, the slow rank's optimizer step included (a rank's own clock
    to the end of its optimizer step would miss what the other ranks still do). Steps of the
    programs interleave, so the load of the host at any moment weighs on all of them alike."""
    times: dict[str, list] = {name: [] for name in programs}
    for x, y in batches:
        for name, (program, opt) in programs.items():
            dist.barrier()
            began = time.perf_counter()
            program.step(x, y)
            stepped = time.perf_counter()
            opt.step()
            opt.zero_grad()
            optimizer = time.perf_counter() - stepped
            dist.barrier()
            times[name].append((time.perf_counter() - began, compute_seconds(program.last_timeline), optimizer))
    return times


def _rounds(programs: dict, batches, args) -> dict:
    """Per program, its mean step time (after ``--warmup`` steps) in each round, and every
    rank's mean compute and optimizer seconds over all rounds (``"busy"``: per program, per
    rank, ``(compute, optimizer)``)."""
    seconds: dict = {name: [] for name in programs}
    busy: dict = {name: [] for name in programs}
    for _ in range(args.rounds):
        times = _alternate(programs, batches[: args.warmup + args.steps])
        for name in programs:
            kept = times[name][args.warmup :]
            seconds[name].append(statistics.fmean(t[0] for t in kept))
            busy[name] += [t[1:] for t in kept]
    mine = {name: tuple(statistics.median(t[k] for t in busy[name]) for k in (0, 1)) for name in programs}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {**seconds, "busy": {name: [r[name] for r in every] for name in programs}}


def _worker(rank: int, world: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    dp_cfg = GPTConfig(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block)
    corpus = SyntheticCorpus(dp_cfg.vocab_size)
    steps = max(args.warmup + args.steps, args.slow_at + args.after)
    batches = [corpus.batch(args.batch, dp_cfg.block_size, s) for s in range(steps)]
    example = batches[0][0]
    slow = f"1:{args.slow:g}"
    os.environ[ENV_VAR] = slow  # the profile sees rank 1 as the slower device it emulates
    try:
        cluster, profiles = measured_cluster()
    finally:
        del os.environ[ENV_VAR]
    out: dict = {"load": [os.getloadavg()], "speeds": [p.peak("fp32") for p in profiles]}
    planned_dp = _program(dp_cfg, example, planned_config("dp", None, example, cluster, profiles, args), slow)
    out["rows"] = tuple(planned_dp[0].plan.rows(args.batch))
    out["auto_speeds"] = [d.profile.peak("fp32") for d in planned_dp[0].config.cluster.devices()]
    dp_planned = wh.Config(row_weights=out["rows"])  # the same rows, for the adaptive part's reference
    if "dp" in parts:
        # The split by measured speed alone (what cluster='auto' gave before it asked the cost
        # model), for reference: the gain of pricing the fixed costs.
        out["speed_rows"] = rows_by_speed(args.batch, out["auto_speeds"])
        speed = _program(dp_cfg, example, wh.Config(row_weights=[float(r) for r in out["speed_rows"]]), slow)
        programs = {"planned": planned_dp, "even": _program(dp_cfg, example, wh.Config(), slow), "speed": speed}
        # Counterbalanced: the same three with rank 0 the slow one, stepped in turn with them.
        # The host's cores run 15-40% apart for seconds at a time; the rank on the slower core
        # adds that to, or takes it from, the emulated factor, and which rank it is changes
        # from run to run. With each rank slow in every round, the pair of ratios carries it
        # both ways.
        mirrored = f"0:{args.slow:g}"
        planned0 = _program(dp_cfg, example, planned_config("dp", None, example, cluster, profiles, args), mirrored)
        out["rows@0"] = tuple(planned0[0].plan.rows(args.batch))
        out["speed_rows@0"] = rows_by_speed(args.batch, [d.profile.peak("fp32") for d in planned0[0].config.cluster.devices()])
        speed0 = wh.Config(row_weights=[float(r) for r in out["speed_rows@0"]])
        programs.update({"planned@0": planned0, "even@0": _program(dp_cfg, example, wh.Config(), mirrored),
                         "speed@0": _program(dp_cfg, example, speed0, mirrored)})
        if args.adaptive_dp:  # the measured rows, then corrected by the steps' own times
            adapted = wh.Config(cluster="auto", adaptive_rows=True, quiet=True)
            programs["planned+adaptive"] = _program(dp_cfg, example, adapted, slow)
        out["dp"] = _rounds(programs, batches, args)
        if args.adaptive_dp:
            out["adapted_moves"] = list(programs["planned+adaptive"][0].rebalancer.moves)
        out["load"].append(os.getloadavg())
    if "pp" in parts:
        pp_cfg = dataclasses.replace(dp_cfg, n_layer=args.pp_layers)
        torch.manual_seed(0)
        pp_planned = planned_config("pp", GPT(pp_cfg), example, cluster, profiles, args)
        even = wh.Config(stage_boundaries=[f"blocks.{args.pp_layers // 2}"], num_micro_batch=args.micro_batches)
        out["cuts"] = (list(pp_planned.stage_boundaries), list(even.stage_boundaries))
        programs = {"planned": _program(pp_cfg, example, pp_planned, slow), "even": _program(pp_cfg, example, even, slow)}
        out["pp"] = _rounds(programs, batches, args)
        out["load"].append(os.getloadavg())
    if "adaptive" in parts:
        out["adaptive"] = _adaptive(dp_cfg, example, dp_planned, batches, args)
        out["load"].append(os.getloadavg())
    if rank == 0:
        results.put(out)


def _adaptive(cfg: GPTConfig, example, planned: wh.Config, batches, args) -> list[dict]:
    """Per round, a fresh ``Config(adaptive_rows=True)`` program slowed from step ``--slow-at``,
    its steps alternating with those of a static program with the planned rows slowed from the
    start (the balanced reference): both programs' step times, and the adaptive one's moves."""
    balanced = _program(cfg, example, planned, f"1:{args.slow:g}")
    later = f"1:{args.slow:g}@{args.slow_at}"
    rounds = []
    for _ in range(args.rounds):
        adaptive = _program(cfg, example, wh.Config(adaptive_rows=True), later)
        times = _alternate({"adaptive": adaptive, "balanced": balanced}, batches[: args.slow_at + args.after])
        steps = {name: [t[0] for t in kept] for name, kept in times.items()}
        rounds.append({**steps, "moves": list(adaptive[0].rebalancer.moves)})
    return rounds


def _recovery(ratios: list[float], slow_at: int) -> tuple[int | None, int | None]:
    """Steps from ``slow_at`` until the step-time ratio adaptive/balanced (step by step, a running
    median of 3) is first within 10%, and until it is within 10% and stays there to the end
    (None: never)."""
    medians = [statistics.median(ratios[k : k + 3]) for k in range(slow_at, len(ratios) - 2)]
    first = next((k for k, m in enumerate(medians) if m <= _WITHIN), None)
    settled = None
    for k in range(len(medians) - 1, -1, -1):
        if medians[k] > _WITHIN:
            break
        settled = k
    return first, settled


def in_run_ideal(rows: dict[str, tuple[int, ...]], seconds: dict) -> tuple[float, float, list[tuple[float, float]]]:
    """The speedup over even rows of the best split of the rows, from this run's measurements:
    ``(ideal, rest, per rank (fixed, per row))``.

    Each rank's busy time (forward and backward, and its optimizer step) is a line in its rows
    through its measured points, one per program (``rows``: each program's rows; least
    squares); ``rest``, the even program's step time beyond its slowest rank's busy time
    (gradient sync, the runtime's per-step work, the barriers), does not depend on the split.
    The best split makes the ranks' lines meet: ``T = (rows + sum a/b) / sum 1/b``. With
    everything in proportion to rows (``a = 0``, ``rest = 0``) and rank 1 ``s`` times slower
    this is ``(s + 1) / 2``; time that does not shrink with rows, and is not slower on the slow
    rank, lowers it."""
    busy = {name: [c + o for c, o in seconds["busy"][name]] for name in rows}
    lines = []
    for r in range(len(busy["even"])):
        xs = [rows[name][r] for name in rows]
        ys = [busy[name][r] for name in rows]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        spread = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread if spread else 0.0
        if slope <= 0 or my - slope * mx < 0:  # one point, or noise: in proportion to rows
            slope = busy["even"][r] / rows["even"][r]
            lines.append((0.0, slope))
        else:
            lines.append((my - slope * mx, slope))
    total = sum(rows["even"])
    best = (total + sum(a / b for a, b in lines)) / sum(1 / b for _, b in lines)
    even = statistics.median(seconds["even"])
    rest = max(0.0, even - max(busy["even"]))
    return even / (best + rest), rest, lines


def _assignment(seconds: dict, suffix: str) -> dict:
    """The programs of one slow rank (names ending in ``suffix``), under their plain names."""
    names = [n for n in seconds if n != "busy" and n.endswith(suffix) and (suffix or "@" not in n)]
    plain = {n: n[: len(n) - len(suffix)] for n in names}
    return {**{plain[n]: seconds[n] for n in names}, "busy": {plain[n]: seconds["busy"][n] for n in names}}


def _print_pair(title: str, seconds: dict, goal: float, ideal: float | None, rows: dict | None = None) -> list[float]:
    """Print the rounds of planned against even and their summary; returns the per-round ratios."""
    ratios = [e / p for e, p in zip(seconds["even"], seconds["planned"])]
    print(title)
    print(f"{'round':>5}  {'planned s/step':>14}  {'even s/step':>12}  {'speedup':>7}")
    for i, (p, e, r) in enumerate(zip(seconds["planned"], seconds["even"], ratios)):
        print(f"{i:>5}  {p:>14.4f}  {e:>12.4f}  {r:>7.3f}")
    for name in seconds["busy"]:
        print(f"  {name}: per rank, median ms of compute (forward, backward) + optimizer step: "
              + ", ".join(f"rank {r} {c * 1e3:.1f} + {o * 1e3:.1f}" for r, (c, o) in enumerate(seconds["busy"][name])))
    median = statistics.median(ratios)
    line = f"speedup planned/even: min {min(ratios):.3f}  median {median:.3f}  max {max(ratios):.3f}  (goal >= {goal}"
    if ideal is not None:
        line += f" and >= 0.9 of the ideal bound {ideal:.2f}: {median / ideal:.2f} of it"
    print(line + ")")
    if rows is not None:
        run_ideal, rest, lines = in_run_ideal(rows, seconds)
        print(f"in-run ideal (best split of this run's measured per-rank times): {run_ideal:.3f}; planned/even reaches "
              f"{median / run_ideal:.2f} of it. Per rank, busy ms = fixed + per row x rows: "
              + ", ".join(f"rank {r} {a * 1e3:.1f} + {b * 1e3:.2f} x rows" for r, (a, b) in enumerate(lines))
              + f"; not shrinking with rows nor slower on the slow rank (sync, runtime, barriers): {rest * 1e3:.1f} ms")
    print()
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description="planned vs even splits on an emulated slow rank; adaptive rows")
    p.add_argument("--parts", default="dp,pp,adaptive", help="comma-separated: dp, pp, adaptive")
    p.add_argument("--pin", action="store_true",
                   help="rank r on core r only (default: the scheduler places the ranks); on this "
                        "project's 2-core host the cores ran 8-25%% apart, pinned or not")
    p.add_argument("--slow", type=float, default=2.0, help="rank 1 is this many times slower")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    # 48 rows: a split moves whole rows, and at 24 one row was 4% of the fast rank's share (its
    # best split fell between two; the planned rows reached 1.32-1.40x, 48 rows 1.41-1.43x).
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pp-layers", type=int, default=6)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--adaptive-dp", action="store_true",
                   help="dp: also Config(cluster='auto', adaptive_rows=True), the measured rows corrected "
                        "by the steps' own times, against even rows")
    p.add_argument("--slow-at", type=int, default=8, help="adaptive: the step rank 1 slows down at")
    p.add_argument("--after", type=int, default=30, help="adaptive: steps run after the slowdown")
    args = p.parse_args()
    load = HostLoad()
    out = run_on_ranks(_worker, args, world=2, pin=args.pin)
    s = args.slow
    print(f"GPT {args.layers}x{args.embd} (pipeline: {args.pp_layers} blocks), global batch {args.batch}x{args.block}, "
          f"2 gloo ranks, rank 1 emulated {s:g}x slower (data parallel: also rank 0, counterbalanced); {args.rounds} rounds")
    print("load average (1, 5, 15 min) at start and after each part: "
          + "; ".join(", ".join(f"{v:.2f}" for v in avg) for avg in out["load"]) + f"; {load.describe()}")
    print("measured fp32 rates: " + ", ".join(f"rank {r} {v / 1e9:.1f} GFLOP/s" for r, v in enumerate(out["speeds"]))
          + f" (whale.planner.measure, for the pipeline's search); cluster='auto' measured rank 0 / rank 1 = "
          f"{out['auto_speeds'][0] / out['auto_speeds'][1]:.2f}x (emulated {s:g}x): planned rows {out['rows']}\n")
    if "dp" in out:
        even = tuple(split_rows(args.batch, (1.0, 1.0)))
        ratios = {}
        for slow_rank, suffix in ((1, ""), (0, "@0")):
            seconds = _assignment(out["dp"], suffix)
            rows = out["rows" + suffix]
            ratios[slow_rank] = _print_pair(
                f"data parallel, rank {slow_rank} slow: planned rows {rows} vs even", seconds, _GOALS["dp"],
                (s + 1) / 2, rows={"planned": rows, "even": even, "speed": out["speed_rows" + suffix]})
            by_speed = [e / p for e, p in zip(seconds["even"], seconds["speed"])]
            over = [p / c for p, c in zip(seconds["speed"], seconds["planned"])]
            print(f"reference, rows by measured speed alone {out['speed_rows' + suffix]}: speedup over even median "
                  f"{statistics.median(by_speed):.3f}; its step time over the planned rows' median "
                  f"{statistics.median(over):.3f} (rounds {', '.join(f'{x:.2f}' for x in over)})\n")
        both = [math.sqrt(a * b) for a, b in zip(ratios[1], ratios[0])]
        median = statistics.median(both)
        print(f"data parallel, counterbalanced (per round, the geometric mean of the two ratios; the core a slow "
              f"rank sits on counts both ways): rounds {', '.join(f'{x:.3f}' for x in both)}\nspeedup planned/even: "
              f"min {min(both):.3f}  median {median:.3f}  max {max(both):.3f}  (goal >= {_GOALS['dp']} and >= 0.9 of "
              f"the ideal bound {(s + 1) / 2:.2f}: {median / ((s + 1) / 2):.2f} of it)\n")
        if "planned+adaptive" in out["dp"]:
            adapted = [e / a for e, a in zip(out["dp"]["even"], out["dp"]["planned+adaptive"])]
            moves = ", ".join(f"step {m[0]}: {m[2]}" for m in out["adapted_moves"]) or "none"
            print(f"planned + adaptive rows (Config(cluster='auto', adaptive_rows=True)): speedup over even min "
                  f"{min(adapted):.3f}  median {statistics.median(adapted):.3f}  max {max(adapted):.3f} "
                  f"({statistics.median(adapted) / ((s + 1) / 2):.2f} of the ideal bound; rounds "
                  f"{', '.join(f'{x:.2f}' for x in adapted)}); its row moves: {moves}\n")
    if "pp" in out:
        planned, even = out["cuts"]
        _print_pair(f"2-stage pipeline, 1F1B x {args.micro_batches}: planned cut {planned} vs even {even}",
                    out["pp"], _GOALS["pp"], None)
    if "adaptive" in out:
        print(f"adaptive rows: even rows, rank 1 slows {s:g}x at step {args.slow_at}; each step alternates with "
              f"the balanced program (planned rows {out['rows']}, slowed from the start)")
        print(f"{'round':>5}  {'before':>6}  {'after':>6}  {'end':>6}  {'first move':>10}  {'within 10%':>10}  "
              f"{'settled':>7}  moves (step: rows from the next step)")
        firsts, settles, moved, ends = [], [], [], []
        for i, r in enumerate(out["adaptive"]):
            ratios = [a / b for a, b in zip(r["adaptive"], r["balanced"])]
            first, settled = _recovery(ratios, args.slow_at)
            firsts.append(first)
            settles.append(settled)
            move = next((m[0] + 1 - args.slow_at for m in r["moves"] if m[0] >= args.slow_at), None)
            moved.append(move)
            ends.append(statistics.median(ratios[-5:]))
            before = statistics.median(ratios[2 : args.slow_at])
            after = statistics.median(ratios[args.slow_at : args.slow_at + 2])
            moves = ", ".join(f"{m[0]}: {m[2]}" for m in r["moves"])
            print(f"{i:>5}  {before:>6.3f}  {after:>6.3f}  {ends[-1]:>6.3f}  {move!s:>10}  {first!s:>10}  "
                  f"{settled!s:>7}  {moves}")
        print("(before/after/end: step time over the balanced program's in the same step, medians of the steps "
              "before the slowdown, its first 2 steps, the last 5; first move, within 10% and settled: steps "
              "after the slowdown until the first row move takes effect, until a running median of 3 ratios "
              "is within 10%, and until it stays within 10% to the end)")

        def summary(values: list) -> str:
            missed = sum(v is None for v in values)
            return f"median {statistics.median(values)}" if not missed else f"{missed} of {len(values)} never"

        print(f"steps until within 10% of balanced: {summary(firsts)} (goal <= 20; rounds {firsts}); settled "
              f"{summary(settles)} (rounds {settles}); first move {summary(moved)}; end ratio median "
              f"{statistics.median(ends):.3f}")


if __name__ == "__main__":
    main()
