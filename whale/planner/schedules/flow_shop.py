"""Pipeline schedules for the search: step time and memory from compute orders, no Action objects.

:func:`whale.planner.schedules.simulator.simulate` replays every send and receive; the planner
scores thousands of candidate pipelines and needs the same numbers faster. With async p2p (the
simulator's default) a compute starts when its rank is free and its input has arrived: the end
of the producing compute on the other rank plus the transfer time. The step is then a flow shop
over the compute orders alone, which :func:`flow_shop` runs over plain tuples. Which compute
waits for which does not depend on the times, so the simulator's loop
(:func:`~.simulator.run_orders`) runs once per shape (schedule, stages, micro-batches, ranks)
to list the computes in an order where each comes after its input (:func:`_program`); each
call then only runs down that list, with run_orders' maxima and sums: the same floats, about
twice as fast (the search runs tens of thousands of schedules). The
results equal the simulator's (``tests/test_search.py`` and ``tests/test_schedules.py`` check
all schedules on random times, float for float).

Peak activation memory does not depend on timing at all: a rank holds a stage's activations
from its forward to its backward, and the order of its computes is fixed by the schedule.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from .generate import _GENERATORS
from .simulator import run_orders

__all__ = [
    "FlowShopResult",
    "compute_orders",
    "flow_shop",
    "peak_held",
    "peak_held_bound",
    "pipeline_estimate",
]


@dataclasses.dataclass(frozen=True)
class FlowShopResult:
    """One pipeline step: per rank, when it finishes, how long it computes, its last compute."""

    step_time: float
    finish: tuple[float, ...]
    busy: tuple[float, ...]
    last_compute: tuple[float, ...]


@functools.lru_cache(maxsize=512)
def compute_orders(
    schedule: str, num_stages: int, num_micro_batch: int, num_ranks: int
) -> tuple[tuple[tuple[bool, int, int], ...], ...]:
    """Per rank, its computes in order as ``(is_forward, stage, micro_batch)``.

    The orders come from the same generators as :func:`~.schedules.make_schedule`, so the
    planner scores exactly the lists the runtime executes.
    """
    return tuple(tuple(_GENERATORS[schedule](r, num_stages, num_micro_batch, num_ranks)) for r in range(num_ranks))


def flow_shop(
    schedule: str,
    num_ranks: int,
    num_micro_batch: int,
    forward: Sequence[float],
    backward: Sequence[float],
    p2p: Sequence[float],
) -> FlowShopResult:
    """Simulate one step with per-stage times (stage ``s`` on rank ``s % num_ranks``).

    Args:
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved_1f1b"``.
        num_ranks: ranks in the pipeline.
        num_micro_batch: micro-batches.
        forward: one micro-batch's forward time per stage.
        backward: one micro-batch's backward time per stage.
        p2p: transfer time per boundary (entry ``s`` between stages ``s`` and ``s + 1``).

    Example::

        flow_shop("1f1b", 4, 8, [1.0] * 4, [2.0] * 4, [0.0] * 3).step_time   # 33.0
    """
    program, per_rank, last = _program(schedule, len(forward), num_micro_batch, num_ranks)
    times = [*forward, *backward]  # a compute's time: forward[s] at s, backward[s] at stages + s
    clock, end = [0.0] * num_ranks, [0.0] * len(program)
    # run_orders' arithmetic: begin = max(clock, input's end + link), end = begin + cost.
    for k, (rank, what, dep, boundary) in enumerate(program):
        now = clock[rank]
        if dep >= 0:
            ready = end[dep] + p2p[boundary]
            now = now if now > ready else ready  # noqa: FURB136 (no call in the hot loop)
        end[k] = clock[rank] = now + times[what]
    busy = tuple(sum([times[w] for w in mine]) for mine in per_rank)  # in order, as run_orders adds
    return FlowShopResult(max(clock), tuple(clock), busy, tuple(times[w] for w in last))


@functools.lru_cache(maxsize=512)
def _program(schedule: str, num_stages: int, num_micro_batch: int, num_ranks: int) -> tuple:
    """The computes of one step in an order where each comes after its input from another rank.

    Returns ``(program, per_rank, last)``: the program's entries are ``(rank, what, dep,
    boundary)`` with ``what`` the compute's index into ``[*forward, *backward]``, ``dep`` the
    entry of the compute on another rank whose output it waits for (-1 when none: the first
    stage's forwards, the last stage's backwards, an input made on the same rank) and
    ``boundary`` the transfer it waits through; ``per_rank`` lists each rank's ``what`` in its
    order and ``last`` its final one. The order is by start time in
    :func:`~.simulator.run_orders` with unit times: every compute starts after its rank's
    previous one and after its input ends, so after both begin.
    """
    orders = compute_orders(schedule, num_stages, num_micro_batch, num_ranks)
    place = [s % num_ranks for s in range(num_stages)]
    ones = [1.0] * num_stages
    starts = run_orders(orders, place, num_micro_batch, ones, ones, [0.0] * (num_stages - 1)).start
    ranked = sorted((starts[rank][h], rank, h) for rank, order in enumerate(orders) for h in range(len(order)))
    at: dict[tuple[bool, int, int], int] = {}  # a compute -> its entry
    program: list[tuple[int, int, int, int]] = []
    for _, rank, h in ranked:
        fwd, s, i = orders[rank][h]
        # The input: the forward of the stage before, or the backward of the stage after.
        source, boundary = ((True, s - 1, i), s - 1) if fwd else ((False, s + 1, i), s)
        on_other = 0 <= source[1] < num_stages and place[source[1]] != rank
        program.append((rank, s if fwd else num_stages + s, at[source] if on_other else -1, boundary))
        at[fwd, s, i] = len(program) - 1
    per_rank = tuple(tuple(s if fwd else num_stages + s for fwd, s, _ in order) for order in orders)
    return tuple(program), per_rank, tuple(mine[-1] for mine in per_rank)


@functools.lru_cache(maxsize=512)
def _held_profile(schedule: str, num_stages: int, num_micro_batch: int, num_ranks: int) -> tuple:
    """Per rank, the held micro-batch count per local stage after each forward (rows: time)."""
    out = []
    for rank, order in enumerate(compute_orders(schedule, num_stages, num_micro_batch, num_ranks)):
        local = {s: k for k, s in enumerate(range(rank, num_stages, num_ranks))}
        held = [0] * len(local)
        points = []
        for fwd, s, _ in order:
            held[local[s]] += 1 if fwd else -1
            if fwd:
                points.append(list(held))
        matrix = np.array(points, dtype=float) if points else np.zeros((1, len(local)))
        # Only the rows no other row dominates can be a peak; keeps the matrix small.
        out.append(np.unique(matrix, axis=0))
    return tuple(out)


def peak_held(
    schedule: str, num_ranks: int, num_micro_batch: int, stage_bytes: Sequence[float]
) -> tuple[float, ...]:
    """Per rank, the most activation bytes held at once, given each stage's bytes per micro-batch.

    Example::

        peak_held("1f1b", 4, 8, [1.0] * 4)   # (4.0, 3.0, 2.0, 1.0)
    """
    stages = len(stage_bytes)
    if stages == num_ranks and schedule in ("gpipe", "1f1b"):
        return peak_held_bound(schedule, num_ranks, num_micro_batch, stage_bytes)  # exact for these
    profile = _held_profile(schedule, stages, num_micro_batch, num_ranks)
    return tuple(
        float((profile[r] @ np.asarray(stage_bytes[r::num_ranks], dtype=float)).max())
        for r in range(num_ranks)
    )


def peak_held_bound(
    schedule: str, num_ranks: int, num_micro_batch: int, stage_bytes: Sequence[float]
) -> tuple[float, ...]:
    """:func:`peak_held` from the schedules' warm-up counts, without generating them.

    Exact for ``gpipe`` (every micro-batch) and ``1f1b`` (rank ``r`` holds ``min(m, p - r)``);
    an upper bound for ``interleaved_1f1b`` (Megatron-LM's warm-up of
    ``2 (p - r - 1) + (v - 1) p`` chunks plus one, each as large as the rank's largest chunk).
    """
    m, p = num_micro_batch, num_ranks
    chunks = len(stage_bytes) // p
    out = []
    for r in range(p):
        mine = stage_bytes[r::p]
        if schedule == "gpipe":
            out.append(m * float(mine[0]))
        elif schedule == "1f1b":
            out.append(min(m, p - r) * float(mine[0]))
        else:
            warmup = 2 * (p - r - 1) + (chunks - 1) * p
            out.append(min(m * chunks, warmup + 1) * float(max(mine)))
    return tuple(out)


def pipeline_estimate(
    num_ranks: int,
    num_micro_batch: int,
    forward: Sequence[float],
    backward: Sequence[float],
    p2p: Sequence[float],
) -> tuple[float, ...]:
    """Closed-form finish time of every rank, for screening.

    The step is ``sum_s c_s + (m - 1) max_s c_s`` for one stage per rank (``c = f + b``;
    Narayanan et al., "PipeDream-2BW", ICML 2021, and the DAPPLE planner), and
    ``m max_r W_r + (p - 1) max_s c_s`` with interleaving (Narayanan et al. 2021, section 2.2:
    the bubble shrinks by the chunk count), plus each transfer twice (activation and gradient).
    Rank ``r`` is done before that by the backward of the last micro-batch through the stages
    below it. Exact for equal stages and free p2p.

    Example::

        pipeline_estimate(4, 8, [1.0] * 4, [2.0] * 4, [0.0] * 3)   # (33.0, 31.0, 29.0, 27.0)
    """
    costs = [f + b for f, b in zip(forward, backward)]
    comm = 2 * sum(p2p)
    if len(costs) == num_ranks:
        step = sum(costs) + (num_micro_batch - 1) * max(costs) + comm
    else:
        work = max(sum(costs[r::num_ranks]) for r in range(num_ranks))
        step = num_micro_batch * work + (num_ranks - 1) * max(costs) + comm
    drain, finish = 0.0, []
    for r in range(num_ranks):
        finish.append(step - drain)
        drain += backward[r] + (p2p[r] if r < len(p2p) else 0.0)
    return tuple(finish)
