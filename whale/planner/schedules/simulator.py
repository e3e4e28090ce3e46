"""Event simulation of a pipeline :class:`~.schedules.Schedule`: step time, bubble, memory.

The simulator runs the same per-rank action lists the runtime executes, with a time per forward
and backward of each stage and per transfer between adjacent stages. Two p2p models:

* async (default; ``isend``/``irecv`` with receives posted early): posting a send or receive
  costs the rank nothing; the transfer starts when the send is posted and takes ``p2p_time``;
  the compute that needs the tensor waits for it. Where a receive sits in the list then does
  not matter, and the step time is that of the compute orders alone (a flow shop).
* blocking (pessimistic): a send and its receive are a rendezvous; both ranks wait until both
  are posted, then for the transfer. A sender also waits while its receiver finishes a compute.

One loop, :func:`run_orders`, advances the ranks' clocks for every prediction: these action
lists, the search's flow shop over compute orders (:mod:`.flow_shop`) and the unit-time run that
places sends and receives in :func:`~.generate.make_schedule`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ...ir.schedule import _B, _F, _RA, _RG, _SA, _SG, Action, ActionKind, Schedule
from ...ir.schedule_check import validate
from ...ir.trace import Timeline, TraceEvent

__all__ = [
    "Item",
    "OrderTimes",
    "SimResult",
    "TimedAction",
    "render_table",
    "run_orders",
    "sim_timeline",
    "simulate",
]


@dataclasses.dataclass(frozen=True)
class TimedAction:
    """An action with its simulated interval.

    For F and B the rank is busy from ``start`` to ``end``. For a send or receive, ``start`` is
    when the rank posted it and ``end`` when the tensor was there for the receiver (never before
    ``start``); with async p2p the rank does not wait for it.
    """

    action: Action
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class SimResult:
    """What one simulated pipeline step costs.

    Example::

        result = simulate(make_schedule("gpipe", 4, 8), forward_time=1.0, backward_time=2.0)
        result.bubble_fraction  # 3 / 11
    """

    step_time: float
    """Time from the first action to the last one finishing, over all ranks."""

    bubble_fraction: float
    """Idle share of compute capacity: ``sum(per_rank_idle) / (num_ranks * step_time)``."""

    per_rank_busy: tuple[float, ...]
    """Time each rank spends in forwards and backwards."""

    per_rank_idle: tuple[float, ...]
    """``step_time - busy`` per rank: waiting for inputs, for transfers, or done early."""

    timeline: tuple[tuple[TimedAction, ...], ...]
    """Every action of every rank with its interval, in list order."""

    peak_in_flight: tuple[int, ...]
    """Most (stage, micro-batch) activations a rank holds at once: forwarded, not yet backwarded."""


def _per_index(
    value: float | Sequence[float], count: int, what: str, unit: str
) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = (float(value),) * count
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = tuple(value)
        if len(values) != count:
            raise ValueError(
                f"simulate({what}=...) has {len(values)} entries; give one per {unit} ({count})"
            )
    else:
        raise TypeError(
            f"simulate({what}=...) is a number or a sequence with one per {unit}, got {value!r}"
        )
    for index, item in enumerate(values):
        if (
            isinstance(item, bool)
            or not isinstance(item, (int, float))
            or not math.isfinite(item)
            or item < 0
        ):
            raise ValueError(
                f"simulate({what}=...): entry {index} is {item!r}; times are finite numbers >= 0"
            )
    return tuple(float(v) for v in values)


Item = tuple[bool | ActionKind, int, int]
"""One entry of a rank's order: ``(is_forward, stage, micro_batch)`` for a compute, or
``(kind, stage, micro_batch)`` with the :class:`ActionKind` of a send or receive."""


@dataclasses.dataclass(frozen=True)
class OrderTimes:
    """What :func:`run_orders` found: when each item began, when each rank finished and worked."""

    start: tuple[list[float], ...]
    """Per rank, per item of its order: a compute's start, or when a send or receive was posted."""

    finish: tuple[float, ...]
    """Per rank, its clock after its last item."""

    busy: tuple[float, ...]
    """Per rank, the time it spent computing."""


def run_orders(
    orders: Sequence[Sequence[Item]],
    stage_to_rank: Sequence[int],
    num_micro_batch: int,
    forward: Sequence[float],
    backward: Sequence[float],
    link: Sequence[float],
    *,
    p2p_listed: bool = False,
    blocking: bool = False,
) -> OrderTimes:
    """Run per-rank orders with per-stage times: the one event loop behind every prediction.

    :func:`simulate` runs a schedule's action lists here, the search's
    :func:`~.flow_shop.flow_shop` the generators' compute orders, and
    :func:`~.generate.make_schedule` the same orders with unit times to place sends and receives.
    A compute starts when its rank is free and its input has arrived: ``link`` after it was sent
    (a tensor made on the same rank is there at once). Nothing is checked; orders that cannot
    run fail an assertion.

    Args:
        orders: per rank, its :data:`Item` s in order.
        stage_to_rank: the rank of each stage.
        num_micro_batch: micro-batches.
        forward: one micro-batch's forward time per stage.
        backward: one micro-batch's backward time per stage.
        link: transfer time per boundary (entry ``s`` between stages ``s`` and ``s + 1``).
        p2p_listed: the orders hold the sends and receives, and a tensor is sent when its rank
            reaches the send; otherwise they hold computes only, each sending at its end.
        blocking: a send and its receive are a rendezvous (needs ``p2p_listed``; see the
            module docstring); otherwise posting them costs the rank nothing.

    Example::

        >>> run_orders([[(True, 0, 0), (False, 0, 0)]], (0,), 1, [1.0], [2.0], []).finish
        (3.0,)
    """
    end_f = [[-1.0] * num_micro_batch for _ in forward]
    end_b = [[-1.0] * num_micro_batch for _ in forward]
    # Indexed by the sending stage; unlisted sends leave when their producer ends.
    sent_f, sent_b = end_f, end_b
    if p2p_listed:
        sent_f, sent_b, got_f, got_b = (
            [[-1.0] * num_micro_batch for _ in forward] for _ in range(4)
        )
        # Per kind: sending stage and boundary relative to the action's stage, its side, the other.
        slots = {
            _SA: (0, 0, sent_f, got_f),
            _RA: (-1, -1, got_f, sent_f),
            _SG: (0, -1, sent_b, got_b),
            _RG: (1, 0, got_b, sent_b),
        }
    last_stage, place, num_ranks = len(forward) - 1, stage_to_rank, len(orders)
    clock, busy, head = [0.0] * num_ranks, [0.0] * num_ranks, [0] * num_ranks
    start = tuple([0.0] * len(order) for order in orders)
    remaining = sum(len(order) for order in orders)
    while remaining:
        before = remaining
        for rank in range(num_ranks):
            order, at, now, work = orders[rank], start[rank], clock[rank], busy[rank]
            first = h = head[rank]
            n = len(order)
            # Conditional expressions instead of max(): no call in the hot loop.
            while h < n:
                code, s, i = order[h]
                if code is True:
                    ready = 0.0
                    if s and place[s - 1] != rank:
                        dep = sent_f[s - 1][i]
                        if dep < 0:
                            break
                        ready = dep + link[s - 1]
                    cost = forward[s]
                    at[h] = begin = now if now > ready else ready  # noqa: FURB136
                    now = end_f[s][i] = begin + cost
                    work += cost
                elif code is False:
                    ready = 0.0
                    if s < last_stage and place[s + 1] != rank:
                        dep = sent_b[s + 1][i]
                        if dep < 0:
                            break
                        ready = dep + link[s]
                    cost = backward[s]
                    at[h] = begin = now if now > ready else ready  # noqa: FURB136
                    now = end_b[s][i] = begin + cost
                    work += cost
                else:
                    shift, edge, mine, theirs = slots[code]
                    at[h] = mine[s + shift][i] = now
                    if blocking:
                        other = theirs[s + shift][i]
                        if other < 0:
                            break
                        now = (now if now > other else other) + link[s + edge]  # noqa: FURB136
                h += 1
            if h != first:
                remaining -= h - first
                head[rank], clock[rank], busy[rank] = h, now, work
        assert remaining < before, "the orders cannot run: some rank waits for a tensor never sent"
    return OrderTimes(start, tuple(clock), tuple(busy))


def simulate(
    schedule: Schedule,
    forward_time: float | Sequence[float],
    backward_time: float | Sequence[float],
    p2p_time: float | Sequence[float] = 0.0,
    *,
    blocking: bool = False,
) -> SimResult:
    """Simulate one step of ``schedule``; the schedule is validated first.

    Args:
        schedule: the per-rank action lists.
        forward_time: time of one micro-batch's forward, one number or one per stage.
        backward_time: time of one micro-batch's backward, one number or one per stage.
        p2p_time: time of one transfer, one number or one per boundary (entry ``s`` is between
            stages ``s`` and ``s + 1``, both directions).
        blocking: model rendezvous send/receive instead of async p2p (see the module docstring).

    With equal stage times and no p2p time, GPipe's bubble is exactly ``(p-1)/(m+p-1)``.

    Example::

        sched = make_schedule("1f1b", num_stages=4, num_micro_batch=8)
        result = simulate(sched, forward_time=[1.0, 1.2, 1.0, 1.5], backward_time=2.0, p2p_time=0.1)
        print(render_table(sched, result))
    """
    validate(schedule)
    stages, lists = schedule.num_stages, schedule.actions
    cost = {
        _F: _per_index(forward_time, stages, "forward_time", "stage"),
        _B: _per_index(backward_time, stages, "backward_time", "stage"),
    }
    link = _per_index(p2p_time, stages - 1, "p2p_time", "boundary between stages")
    orders = [
        [(a.kind is _F if a.is_compute else a.kind, a.stage, a.micro_batch) for a in actions]
        for actions in lists
    ]
    run = run_orders(
        orders,
        schedule.stage_to_rank,
        schedule.num_micro_batch,
        cost[_F],
        cost[_B],
        link,
        p2p_listed=True,
        blocking=blocking,
    )
    posted = {
        action: at
        for actions, starts in zip(lists, run.start)
        for action, at in zip(actions, starts)
        if not action.is_compute
    }

    def arrival(send: Action) -> float:
        """When the tensor of ``send`` is at the receiver."""
        sent = posted[send]
        if blocking:
            sent = max(sent, posted[send.matching()])
        # Boundary s lies between stages s and s + 1.
        return sent + link[send.stage if send.kind is _SA else send.stage - 1]

    timeline, peak = [], []
    for actions, starts in zip(lists, run.start):
        entries, held, most = [], 0, 0
        for action, start in zip(actions, starts):
            if action.is_compute:
                # The same sum as in run_orders, so the end is its end exactly.
                end = start + cost[action.kind][action.stage]
                held += 1 if action.kind is _F else -1
                most = max(most, held)
            else:
                end = max(start, arrival(action if action.is_send else action.matching()))
            entries.append(TimedAction(action, start, end))
        timeline.append(tuple(entries))
        peak.append(most)
    step_time = max(run.finish)
    idle = tuple(step_time - b for b in run.busy)
    return SimResult(
        step_time=step_time,
        bubble_fraction=sum(idle) / (len(lists) * step_time) if step_time > 0 else 0.0,
        per_rank_busy=run.busy,
        per_rank_idle=idle,
        timeline=tuple(timeline),
        peak_in_flight=tuple(peak),
    )


def render_table(schedule: Schedule, times: SimResult | None = None) -> str:
    """A rank-by-time grid of the computes: one row per rank, time running left to right.

    ``times`` is the :class:`SimResult` to draw; None simulates with forward and backward both
    taking one time unit and free p2p. When every compute starts and ends on a multiple of the
    shortest compute time, each column is that long; otherwise a column runs from one start or
    end to the next. The axis gives each column's start time. A compute spanning several columns
    continues with ``-``; ``.`` is idle. Sends, receives and zero-time computes are not drawn (a
    wait for a transfer shows as idle).

    Example::

        >>> print(render_table(make_schedule("1f1b", 2, 3)))
        1f1b: 2 stages on 2 ranks, 3 micro-batches; step time 8, bubble 25.0%
        time    0   1   2   3   4   5   6   7
        rank 0  0F0 0F1 .   0B0 0F2 0B1 .   0B2
        rank 1  .   1F0 1B0 1F1 1B1 1F2 1B2 .
    """
    result = simulate(schedule, 1.0, 1.0) if times is None else times
    if len(result.timeline) != schedule.num_ranks:
        raise ValueError(
            f"render_table: the result has {len(result.timeline)} ranks, "
            f"the schedule {schedule.num_ranks}; pass the SimResult of this schedule"
        )
    computes = [
        (rank, t)
        for rank, row in enumerate(result.timeline)
        for t in row
        if t.action.is_compute and t.end > t.start
    ]
    # Rounded so that float noise does not open one-off columns.
    edges = sorted({round(x, 9) for _, t in computes for x in (t.start, t.end)} | {0.0})
    unit = min((t.end - t.start for _, t in computes), default=1.0)
    if all(abs(x / unit - round(x / unit)) < 1e-6 for x in edges):
        edges = [unit * k for k in range(round(edges[-1] / unit) + 1)]
    column = {round(x, 9): k for k, x in enumerate(edges)}
    cells = [["."] * max(1, len(edges) - 1) for _ in result.timeline]
    for rank, timed in computes:
        first, last = column[round(timed.start, 9)], column[round(timed.end, 9)]
        cells[rank][first:last] = [str(timed.action)] + ["-"] * (last - first - 1)
    labels = [f"{x:g}" for x in edges[:-1]] or ["0"]
    width = 1 + max(len(c) for c in [*labels, *(c for row in cells for c in row)])
    lines = [
        f"{schedule.name}: {schedule.num_stages} stages on {schedule.num_ranks} ranks, "
        f"{schedule.num_micro_batch} micro-batches; step time {result.step_time:g}, "
        f"bubble {result.bubble_fraction:.1%}",
        "time".ljust(8) + "".join(label.ljust(width) for label in labels).rstrip(),
    ]
    for rank, row in enumerate(cells):
        lines.append(f"rank {rank}".ljust(8) + "".join(c.ljust(width) for c in row).rstrip())
    return "\n".join(lines)


_TRACE_CATEGORY = {
    ActionKind.FORWARD: "forward",
    ActionKind.BACKWARD: "backward",
    ActionKind.SEND_ACT: "send",
    ActionKind.SEND_GRAD: "send",
    ActionKind.RECV_ACT: "recv",
    ActionKind.RECV_GRAD: "recv",
}


def sim_timeline(result: SimResult, ranks: Sequence[int] | None = None) -> Timeline:
    """The simulated step as a :class:`~whale.ir.trace.Timeline` (source ``"simulated"``).

    Every :class:`TimedAction` becomes one :class:`~whale.ir.trace.TraceEvent` with the same
    interval, named ``<code><stage>.<micro-batch>`` (``"F1.3"``, ``"B1.3"``, ``"SA1.3"``) and
    categorised ``forward``, ``backward``, ``send`` or ``recv``.

    Args:
        result: what :func:`simulate` returned.
        ranks: the global rank of each schedule position (``ranks[k]`` runs
            ``result.timeline[k]``); None: the positions themselves.

    Example::

        result = simulate(make_schedule("1f1b", 2, 4), 1.0, 2.0)
        save_chrome_trace("sim.json", sim_timeline(result, ranks=[4, 5]))
    """
    positions = len(result.timeline)
    ranks = tuple(range(positions)) if ranks is None else tuple(ranks)
    if len(ranks) != positions or any(
        isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks
    ):
        raise ValueError(
            f"sim_timeline(ranks={list(ranks)!r}): give one global rank (an int >= 0) for each "
            f"of the {positions} schedule positions"
        )
    events = [
        TraceEvent(
            rank=rank,
            name=f"{timed.action.kind.value}{timed.action.stage}.{timed.action.micro_batch}",
            category=_TRACE_CATEGORY[timed.action.kind],
            start=timed.start,
            end=timed.end,
            stage=timed.action.stage,
            micro_batch=timed.action.micro_batch,
        )
        for rank, row in zip(ranks, result.timeline)
        for timed in row
    ]
    return Timeline("simulated", events)
