"""Pipeline parallel: whale ``PipelineProgram`` against ``torch.distributed.pipelining``.

The same GPT, split at the same place (embeddings and ``blocks[:k]`` on stage 0; ``blocks[k:]``,
``ln_f`` and ``lm_head`` on stage 1), the same schedule and micro-batch count, the same initial
weights and global batches, on 2 gloo ranks. whale gets ``stage_boundaries=["blocks.k"]``; torch
gets two hand-built stage modules in ``PipelineStage`` and ``Schedule1F1B``/``ScheduleGPipe``.
Rounds alternate (whale, torch, whale, ...) so that drift of the machine hits both alike; the
ratio is whale's throughput over torch's in the same round, with min/median/max over rounds.

The GPT is benchmarked *untied* for both: manual torch stages cannot share ``wte.weight`` with
``lm_head.weight`` across ranks, so ``lm_head`` gets its own copy of the initial weight.

Beside the throughput, whale's measured bubble is set against the simulator's prediction from
whale's own mean forward/backward time per stage (from ``program.last_timeline``), with free p2p
and with a ping-pong-measured transfer time. The measured bubble is the simulator's definition,
computed from every rank's entry time and ``last_timeline`` by ``step_bubble`` (what
``program.measured_bubble()`` returns).
Per-step times (the slower rank's) give a median and best ratio that resist a busy machine.

whale's overhead off the compute path is printed per micro-batch, two ways, each against its
goal (under 0.5 ms per micro-batch; measured bubble within 3 points of the simulated one):

* against the simulation from mean times: (measured span - simulated span) / micro-batches,
  medians over the timed steps. On a shared machine compute times jitter, and in a pipeline
  jitter alone lengthens the step (each micro-batch waits for the slower of two ranks), so this
  counts the machine's noise with whale's overhead.
* against a replay of each measured step: the same async p2p model (a transfer takes the
  ping-pong time, posting costs nothing) run with that step's own forward and backward times,
  so the difference is only what whale adds between computes (Python, posting transfers,
  waiting longer than a ping-pong for data).

``--trace PREFIX`` writes the last whale step, simulated and measured side by side, as a Chrome
trace ``PREFIX.json`` (ui.perfetto.dev, chrome://tracing) and a picture ``PREFIX.png``.

Run (spawns its own 2 processes)::

    python benchmarks/bench_pp.py
    python benchmarks/bench_pp.py --schedule gpipe --micro-batches 8 --rounds 7
    python benchmarks/bench_pp.py --micro-batches 8 --trace /tmp/pp_step
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import run_on_ranks

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from whale.ir.schedule import Schedule
from whale.ir.trace import save_chrome_trace
from whale.planner.schedules.generate import make_schedule
from whale.planner.schedules.simulator import sim_timeline, simulate
from whale.runtime.pipeline import step_bubble

# The goals: whale's time off the compute path, and the bubble against the simulator's.
_GOAL_OVERHEAD_S = 0.5e-3
_GOAL_BUBBLE_POINTS = 3.0

_TORCH_SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}


class _FirstStage(nn.Module):
    """Embeddings and ``blocks[:split]`` of a GPT: ``idx -> hidden``."""

    def __init__(self, gpt: GPT, split: int) -> None:
        super().__init__()
        self.wte, self.wpe = gpt.wte, gpt.wpe
        self.blocks = nn.ModuleList(gpt.blocks[:split])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return x


class _LastStage(nn.Module):
    """``blocks[split:]``, ``ln_f`` and ``lm_head`` of a GPT: ``hidden -> logits``."""

    def __init__(self, gpt: GPT, split: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(gpt.blocks[split:])
        self.ln_f, self.lm_head = gpt.ln_f, gpt.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _untied_gpt(cfg: GPTConfig) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(cfg)
    # Manual stages on two ranks cannot share a weight; both sides get the untied model.
    gpt.lm_head.weight = nn.Parameter(gpt.wte.weight.detach().clone())
    return gpt


def _p2p_seconds(shape: tuple[int, ...], rank: int, reps: int = 20) -> float:
    """One-way time of a float32 tensor of ``shape`` between the 2 ranks: half a ping-pong."""
    t = torch.zeros(shape)
    peer = 1 - rank
    for i in range(reps + 2):
        if i == 2:  # two untimed round trips open the connection
            dist.barrier()
            start = time.perf_counter()
        if rank == 0:
            dist.send(t, peer)
            dist.recv(t, peer)
        else:
            dist.recv(t, peer)
            dist.send(t, peer)
    return (time.perf_counter() - start) / reps / 2


def _compute_times(timeline) -> dict[tuple[int, str], list[float]]:
    """Durations of the forwards and backwards of one step's timeline, by (stage, "F"/"B")."""
    times: dict[tuple[int, str], list[float]] = {}
    for code, begin, end in timeline:
        stage, kind = int(code[0]), code[1]
        if kind in "FB":
            times.setdefault((stage, kind), []).append(end - begin)
    return times


def _replay(sched: Schedule, timelines: list[tuple], p2p: float) -> tuple[float, float]:
    """Bubble and span of one measured step replayed under the simulator's async p2p model.

    Each compute takes its measured duration (``timelines[r]`` is rank r's ``last_timeline``),
    a transfer ``p2p`` from its send, posting costs nothing: what the step would take with
    nothing of whale's between the computes.
    """
    took = {code: end - begin for timeline in timelines for code, begin, end in timeline}
    clock, busy, head = [0.0] * sched.num_ranks, [0.0] * sched.num_ranks, [0] * sched.num_ranks
    arrival: dict = {}
    left = sum(len(a) for a in sched.actions)
    while left:
        moved = False
        for r, actions in enumerate(sched.actions):
            while head[r] < len(actions):
                a = actions[head[r]]
                if a.is_compute:
                    needs = sched.input_receive(a)
                    if needs is not None and needs not in arrival:
                        break
                    start = max(clock[r], arrival.get(needs, 0.0))
                    clock[r] = start + took[str(a)]
                    busy[r] += took[str(a)]
                elif a.is_send:
                    arrival[a.matching()] = clock[r] + p2p
                head[r] += 1
                left -= 1
                moved = True
        assert moved, "the schedule deadlocks"
    span = max(clock)
    return 1.0 - sum(busy) / (len(clock) * span), span


class _ComputeClock:
    """Thread CPU seconds this rank spends computing: in the stage modules' forwards, the loss
    and autograd's backward (whichever library calls them). A step's CPU time minus these is
    what the library spends around the computes; CPU time leaves out waiting for a busy
    machine's cores, so it stays steady where wall times do not."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._began = 0.0

    def attach(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_) -> None:
        self._began = time.thread_time()

    def _post(self, *_) -> None:
        self.seconds += time.thread_time() - self._began

    def wrap(self, fn):
        def timed(*args, **kwargs):
            began = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - began

        return timed


def _worker(rank: int, world: int, args: argparse.Namespace, results) -> None:
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, block_size=args.block)
    split = args.split if args.split is not None else args.layers // 2
    corpus = SyntheticCorpus(cfg.vocab_size)
    n = args.warmup + args.steps
    batches = [corpus.batch(args.batch, cfg.block_size, s) for s in range(n)]
    gpt = _untied_gpt(cfg)
    m = args.micro_batches

    clock = _ComputeClock()
    loss_fn = clock.wrap(lm_loss)
    torch.autograd.backward = clock.wrap(torch.autograd.backward)  # this process's, both libraries'
    config = wh.Config(stage_boundaries=[f"blocks.{split}"], schedule=args.schedule, num_micro_batch=m)
    program = wh.parallelize(copy.deepcopy(gpt), loss_fn=loss_fn, example_inputs=(batches[0][0],), config=config)
    clock.attach(program.stages[rank].module)  # rank r runs stage r (2 stages, not interleaved)
    whale_opt = torch.optim.AdamW(program.parameters(), lr=1e-3)

    stage_cls = _FirstStage if rank == 0 else _LastStage
    stage = PipelineStage(stage_cls(copy.deepcopy(gpt), split), rank, world, torch.device("cpu"))
    clock.attach(stage.submod)
    schedule = _TORCH_SCHEDULES[args.schedule](stage, n_microbatches=m, loss_fn=loss_fn)
    torch_opt = torch.optim.AdamW(stage.submod.parameters(), lr=1e-3)

    def torch_step(x, y):
        if rank == 0:
            schedule.step(x)
            return None
        losses: list[torch.Tensor] = []
        schedule.step(target=y, losses=losses)
        # torch's loss per micro-batch is a mean over its rows; equal rows -> their mean.
        return torch.stack(losses).mean()

    # Same weights, same first batch, no optimizer step yet: the losses must agree.
    x0, y0 = batches[0]
    whale_loss0 = program.step(x0, y0).item()
    torch_loss0 = torch_step(x0, y0)
    whale_opt.zero_grad()
    torch_opt.zero_grad()

    timelines: list[tuple] = []  # per timed whale step: this rank's (entry time, last_timeline)

    def whale_step(x, y):
        program.step(x, y)

    def record_whale():
        timelines.append((program.last_step_entry, program.last_timeline))  # parsed after the rounds

    # Per timed step, the thread CPU seconds spent outside the computes.
    cpu: dict[str, list[float]] = {"whale": [], "torch": []}

    def train(step_fn, opt, after=None) -> tuple[float, list[float]]:
        """Seconds per step over ``batches[warmup:]``, and this rank's time of each of those steps."""
        stamps = []
        for i, (x, y) in enumerate(batches):
            if i == args.warmup:
                dist.barrier()
                start = time.perf_counter()
                stamps.append(start)
            began, computed = time.thread_time(), clock.seconds
            step_fn(x, y)
            if i >= args.warmup:
                spent = time.thread_time() - began - (clock.seconds - computed)
                cpu["whale" if step_fn is whale_step else "torch"].append(spent)
            opt.step()
            opt.zero_grad()
            if i >= args.warmup:
                stamps.append(time.perf_counter())
                if after is not None:
                    after()
        dist.barrier()
        per_step = [b - a for a, b in itertools.pairwise(stamps)]
        return (time.perf_counter() - start) / (len(batches) - args.warmup), per_step

    ratios, whale_s, torch_s, whale_steps, torch_steps = [], [], [], [], []
    for _ in range(args.rounds):
        w, w_steps = train(whale_step, whale_opt, record_whale)
        t, t_steps = train(torch_step, torch_opt)
        whale_s.append(w)
        torch_s.append(t)
        whale_steps += w_steps
        torch_steps += t_steps
        ratios.append(t / w)  # throughput ratio = inverse time ratio

    compute: dict[tuple[int, str], list[float]] = {}
    for _, timeline in timelines:
        for key, durations in _compute_times(timeline).items():
            compute.setdefault(key, []).extend(durations)
    mb_shape = (args.batch // m, cfg.block_size, cfg.n_embd)
    p2p = _p2p_seconds(mb_shape, rank)
    mine = {
        "timelines": timelines,
        "whale_steps": whale_steps,
        "torch_steps": torch_steps,
        "compute": {key: (statistics.mean(v), statistics.pstdev(v)) for key, v in compute.items()},
        "torch_loss0": None if torch_loss0 is None else torch_loss0.item(),
        "p2p": p2p,
        "cpu": {k: statistics.median(v) for k, v in cpu.items()},
    }
    measured = program.timeline()  # the last timed step, every rank's (collective)
    gathered: list[dict] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        results.put((ratios, whale_s, torch_s, whale_loss0, gathered, measured))


def main() -> None:
    p = argparse.ArgumentParser(description="whale pipeline vs torch.distributed.pipelining, 2 gloo ranks")
    p.add_argument("--schedule", choices=sorted(_TORCH_SCHEDULES), default="1f1b")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--split", type=int, default=None, help="first block of stage 1 (default layers // 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--trace", metavar="PREFIX", default=None,
                   help="write the last step, simulated and measured, to PREFIX.json (Chrome trace) and PREFIX.png")
    args = p.parse_args()
    world = 2
    if args.batch % args.micro_batches:
        p.error(f"--batch {args.batch} must be a multiple of --micro-batches {args.micro_batches}, "
                "so both libraries cut equal micro-batches")
    ratios, whale_s, torch_s, whale_loss0, per_rank, measured_tl = run_on_ranks(
        _worker, args, world=world, threads=args.threads)

    split = args.split if args.split is not None else args.layers // 2
    tok = args.batch * args.block
    print(f"GPT {args.layers}x{args.embd} (lm_head untied from wte for both), global batch "
          f"{args.batch}x{args.block}, {world} gloo ranks, stages [emb, blocks 0-{split - 1}] | "
          f"[blocks {split}-{args.layers - 1}, ln_f, lm_head], {args.schedule}, "
          f"{args.micro_batches} micro-batches, {args.rounds} rounds x {args.steps} steps")
    print(f"first-batch loss: whale {whale_loss0:.6f}  torch {per_rank[1]['torch_loss0']:.6f}")
    print(f"{'round':>5}  {'whale tok/s':>12}  {'torch tok/s':>12}  {'ratio':>6}")
    for i, (w, t, r) in enumerate(zip(whale_s, torch_s, ratios)):
        print(f"{i:>5}  {tok / w:>12,.0f}  {tok / t:>12,.0f}  {r:>6.3f}")
    print(f"throughput ratio whale/torch: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  "
          f"max {max(ratios):.3f}")
    # Per step, the slower rank's time; median and best over all rounds resist a busy machine.
    w_steps = [max(t) for t in zip(*(r["whale_steps"] for r in per_rank))]
    t_steps = [max(t) for t in zip(*(r["torch_steps"] for r in per_rank))]
    print(f"per-step ms  whale median {statistics.median(w_steps) * 1e3:.1f} best {min(w_steps) * 1e3:.1f}  "
          f"torch median {statistics.median(t_steps) * 1e3:.1f} best {min(t_steps) * 1e3:.1f}  ->  ratio "
          f"median {statistics.median(t_steps) / statistics.median(w_steps):.3f} "
          f"best {min(t_steps) / min(w_steps):.3f}")

    # Rank r holds stage r: its mean F and B per micro-batch feed the simulator.
    fwd, fwd_sd = zip(*(per_rank[s]["compute"][(s, "F")] for s in range(world)))
    bwd, bwd_sd = zip(*(per_rank[s]["compute"][(s, "B")] for s in range(world)))
    p2p = statistics.mean(r["p2p"] for r in per_rank)
    sched = make_schedule(args.schedule, world, args.micro_batches)
    free = simulate(sched, fwd, bwd)
    costed = simulate(sched, fwd, bwd, p2p_time=p2p)
    # The simulator's definition (step_bubble): the step starts when the last rank enters it
    # and ends with the last action on any rank.
    measured = [step_bubble(step) for step in zip(*(r["timelines"] for r in per_rank))]
    bubble, span = (statistics.mean(col) for col in zip(*measured))
    ms = 1e3
    print("whale per micro-batch, mean ± sd (ms): " + "  ".join(
        f"stage {s} F {fwd[s] * ms:.1f}±{fwd_sd[s] * ms:.1f} B {bwd[s] * ms:.1f}±{bwd_sd[s] * ms:.1f}"
        for s in range(world))
        + f"  p2p {p2p * ms:.3f} (ping-pong, {args.batch // args.micro_batches}x{args.block}x{args.embd} fp32)")
    print(f"{'whale bubble':<42}{'bubble':>7}  {'span ms':>8}")
    rows = [
        ("measured (last rank in to last action)", bubble, span),
        ("simulated, p2p = 0", free.bubble_fraction, free.step_time),
        ("simulated, p2p = ping-pong", costed.bubble_fraction, costed.step_time),
    ]
    for label, bubble, span in rows:
        print(f"  {label:<40}{bubble:>7.1%}  {span * ms:>8.1f}")

    # whale's time off the compute path, per micro-batch, against the goals (medians over steps).
    m = args.micro_batches
    steps = list(zip(*(r["timelines"] for r in per_rank)))
    spans = [step_bubble(step) for step in steps]
    replays = [_replay(sched, [t for _, t in step], p2p) for step in steps]
    med = statistics.median
    vs_sim = (med(sp for _, sp in spans) - costed.step_time) / m
    gap_sim = (med(b for b, _ in spans) - costed.bubble_fraction) * 100
    vs_replay = med((sp - rsp) / m for (_, sp), (_, rsp) in zip(spans, replays))
    gap_replay = med((b - rb) * 100 for (b, _), (rb, _) in zip(spans, replays))

    def verdict(ok: bool) -> str:
        return "meets the goal" if ok else "misses the goal"

    print(f"whale overhead off the compute path, per micro-batch ({m}), medians over {len(steps)} steps "
          f"(goal < {_GOAL_OVERHEAD_S * ms:.1f} ms; bubble within {_GOAL_BUBBLE_POINTS:.0f} points):")
    print(f"  vs simulated from mean times:          {vs_sim * ms:6.2f} ms/micro-batch ({verdict(vs_sim < _GOAL_OVERHEAD_S)}), "
          f"bubble measured - simulated {gap_sim:+.1f} points ({verdict(abs(gap_sim) <= _GOAL_BUBBLE_POINTS)})")
    print(f"  vs replay of each step's own computes: {vs_replay * ms:6.2f} ms/micro-batch ({verdict(vs_replay < _GOAL_OVERHEAD_S)}), "
          f"bubble measured - replayed {gap_replay:+.1f} points ({verdict(abs(gap_replay) <= _GOAL_BUBBLE_POINTS)})")
    jitter = med(sp for _, sp in replays) - costed.step_time
    print(f"  (compute jitter alone: replayed span - simulated span = {jitter * ms:+.1f} ms per step)")
    # CPU time does not count waiting for a busy machine's cores: a steadier view of the same cost.
    print("CPU off the compute path per micro-batch (a step's thread CPU outside forward, loss and "
          "backward; medians over steps):")
    for name, label in (("whale", "whale"), ("torch", "torch.distributed.pipelining")):
        per = [r["cpu"][name] / m for r in per_rank]
        print(f"  {label:<29}" + "  ".join(f"rank {k} {v * ms:5.3f} ms" for k, v in enumerate(per)))

    if args.trace:
        simulated = sim_timeline(costed)
        save_chrome_trace(f"{args.trace}.json", simulated, measured_tl)
        from whale.plot import draw_timelines

        draw_timelines(f"{args.trace}.png", simulated, measured_tl)
        print(f"last step, simulated and measured: {args.trace}.json (Chrome trace), {args.trace}.png")


if __name__ == "__main__":
    main()
