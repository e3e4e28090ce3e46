"""Event simulation of a pipeline :class:`~.schedules.Schedule`: step time, bubble, memory.

The simulator runs the same per-rank action lists the runtime executes, with a time per forward
and backward of each stage and per transfer between adjacent stages. Two p2p models:

* async (default; ``isend``/``irecv`` with receives posted early): posting a send or receive
  costs the rank nothing; the transfer starts when the send is posted and takes ``p2p_time``;
  the compute that needs the tensor waits for it. Where a receive sits in the list then does
  not matter, and the step time is that of the compute orders alone (a flow shop).
* blocking (pessimistic): a send and its receive are a rendezvous; both ranks wait until both
  are posted, then for the transfer. A sender also waits while its receiver finishes a compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ...ir.schedule_check import validate
from ...ir.schedule import Action, ActionKind, Schedule

__all__ = ["SimResult", "TimedAction", "render_table", "simulate"]

_F, _B = ActionKind.FORWARD, ActionKind.BACKWARD


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
    # Keyed by the send action: [send posted, receive posted].
    posted: dict[Action, list[float | None]] = {}

    def arrival(send: Action) -> float | None:
        """When the tensor of ``send`` is at the receiver, or None if not known yet."""
        sent, received = posted.get(send, (None, None))
        if sent is None or (blocking and received is None):
            return None
        start = max(sent, received) if blocking and received is not None else sent
        # Boundary s lies between stages s and s + 1.
        return start + link[send.stage if send.kind is ActionKind.SEND_ACT else send.stage - 1]

    num_ranks = len(lists)
    clock = [0.0] * num_ranks
    busy = [0.0] * num_ranks
    held, peak = [0] * num_ranks, [0] * num_ranks
    head = [0] * num_ranks
    timeline: list[list[list]] = [[] for _ in lists]
    remaining = sum(len(actions) for actions in lists)
    while remaining:
        progressed = False
        for rank, actions in enumerate(lists):
            while head[rank] < len(actions):
                action = actions[head[rank]]
                if action.is_compute:
                    receive = schedule.input_receive(action)
                    send = None if receive is None else receive.matching()
                    ready = 0.0 if send is None else arrival(send)
                    if ready is None:
                        break
                    start = max(clock[rank], ready)
                    clock[rank] = start + cost[action.kind][action.stage]
                    busy[rank] += cost[action.kind][action.stage]
                    held[rank] += 1 if action.kind is _F else -1
                    peak[rank] = max(peak[rank], held[rank])
                    timeline[rank].append([action, start, clock[rank]])
                else:
                    send = action if action.is_send else action.matching()
                    times = posted.setdefault(send, [None, None])
                    side = 0 if action.is_send else 1
                    if times[side] is None:
                        times[side] = clock[rank]
                    done = arrival(send)
                    if blocking:
                        if done is None:
                            break
                        clock[rank] = done
                    # With async p2p a receive posted before its send gets its end below.
                    timeline[rank].append([action, times[side], done])
                head[rank] += 1
                remaining -= 1
                progressed = True
        # validate() proved the lists finish under rendezvous p2p, which is stricter than async.
        assert progressed, "simulation stalled on a validated schedule"
    step_time = max(clock, default=0.0)
    frozen = []
    for rank_timeline in timeline:
        entries = []
        for action, start, end in rank_timeline:
            if end is None:
                end = arrival(action if action.is_send else action.matching())
            entries.append(TimedAction(action, start, max(start, end)))
        frozen.append(tuple(entries))
    idle = tuple(step_time - b for b in busy)
    return SimResult(
        step_time=step_time,
        bubble_fraction=sum(idle) / (num_ranks * step_time) if step_time > 0 else 0.0,
        per_rank_busy=tuple(busy),
        per_rank_idle=idle,
        timeline=tuple(frozen),
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
