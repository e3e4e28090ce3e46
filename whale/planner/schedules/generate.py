"""Schedule generators: each rank's compute order, then sends and receives placed deadlock-free.

``make_schedule`` returns a :class:`~whale.ir.schedule.Schedule`, the data the simulator
predicts and the runtime executes.
"""

from __future__ import annotations

from collections.abc import Callable

from ...ir.schedule import (
    _B,
    _F,
    _SA,
    _SG,
    SCHEDULE_NAMES,
    Action,
    Schedule,
    _check_int,
)
from .simulator import run_orders

__all__ = ["make_schedule"]


# A rank's computes in order, as (is_forward, stage, micro_batch): plain tuples, so that the
# planner can score long schedules without building an Action per compute.
_Order = list[tuple[bool, int, int]]


def _gpipe(rank: int, num_stages: int, num_micro_batch: int, num_ranks: int) -> _Order:
    # All forwards, then all backwards (torch's ScheduleGPipe order).
    return [(True, rank, i) for i in range(num_micro_batch)] + [(False, rank, i) for i in range(num_micro_batch)]


def _one_f_one_b(rank: int, num_stages: int, num_micro_batch: int, num_ranks: int) -> _Order:
    # Warm-up forwards fill the pipe below this stage; then one forward, one backward.
    warmup = min(num_stages - rank - 1, num_micro_batch)
    order = [(True, rank, i) for i in range(warmup)]
    for i in range(num_micro_batch - warmup):
        order += [(True, rank, warmup + i), (False, rank, i)]
    return order + [(False, rank, i) for i in range(num_micro_batch - warmup, num_micro_batch)]


def _interleaved_one_f_one_b(
    rank: int, num_stages: int, num_micro_batch: int, num_ranks: int
) -> _Order:
    # Megatron-LM's interleaved schedule: micro-batches go in groups of num_ranks through each
    # model chunk (virtual stage) in turn; chunk c of this rank is stage c * num_ranks + rank.
    chunks = num_stages // num_ranks
    total = num_micro_batch * chunks

    def action(forward: bool, k: int) -> tuple[bool, int, int]:
        chunk = (k // num_ranks) % chunks
        if not forward:
            chunk = chunks - 1 - chunk
        micro_batch = (k // (num_ranks * chunks)) * num_ranks + k % num_ranks
        return (forward, chunk * num_ranks + rank, micro_batch)

    warmup = min((num_ranks - rank - 1) * 2 + (chunks - 1) * num_ranks, total)
    order = [action(True, k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [action(True, warmup + k), action(False, k)]
    return order + [action(False, k) for k in range(total - warmup, total)]


_GENERATORS: dict[str, Callable[[int, int, int, int], _Order]] = {
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved_1f1b": _interleaved_one_f_one_b,
}
assert tuple(_GENERATORS) == SCHEDULE_NAMES
# Unit costs used only to place sends/receives; backward ~ 2x forward is the usual ratio.
_PLACEMENT_FORWARD, _PLACEMENT_BACKWARD = 1, 2


def make_schedule(
    name: str, num_stages: int, num_micro_batch: int, num_ranks: int | None = None
) -> Schedule:
    """Generate a named schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved_1f1b"``.

    ``gpipe`` and ``1f1b`` run one stage per rank (``num_ranks`` is None or ``num_stages``).
    ``interleaved_1f1b`` needs ``num_ranks``: stage ``s`` runs on rank ``s % num_ranks`` (Megatron's
    layout, ``num_stages // num_ranks`` virtual stages per rank), and as in Megatron
    ``num_micro_batch`` must be a multiple of ``num_ranks``.

    Sends and receives are placed so that the lists are deadlock-free even with blocking p2p:
    they are the per-rank projections of one global order in which each send and its receive
    are a single event (as torch's pipelining lowers its schedules).

    Example::

        sched = make_schedule("interleaved_1f1b", num_stages=8, num_micro_batch=8, num_ranks=4)
        print(format_schedule(sched))
    """
    if name not in _GENERATORS:
        raise ValueError(
            f"unknown pipeline schedule {name!r}; known schedules: {list(SCHEDULE_NAMES)}"
        )
    _check_int("make_schedule", "num_stages", num_stages, 1)
    _check_int("make_schedule", "num_micro_batch", num_micro_batch, 1)
    if name == "interleaved_1f1b":
        if num_ranks is None:
            raise ValueError(
                f"make_schedule('interleaved_1f1b', num_stages={num_stages}) needs num_ranks: "
                "each rank holds num_stages // num_ranks virtual stages"
            )
        _check_int("make_schedule", "num_ranks", num_ranks, 1)
        if num_stages % num_ranks:
            raise ValueError(
                f"interleaved_1f1b: num_stages={num_stages} is not a multiple of "
                f"num_ranks={num_ranks}; every rank must hold the same number of virtual stages"
            )
        if num_micro_batch % num_ranks:
            rounded = num_micro_batch + (-num_micro_batch) % num_ranks
            raise ValueError(
                f"interleaved_1f1b: num_micro_batch={num_micro_batch} is not a multiple of "
                f"num_ranks={num_ranks} (micro-batches go through the chunks in groups of "
                f"num_ranks, as in Megatron-LM); use e.g. {rounded}"
            )
    elif num_ranks is not None and num_ranks != num_stages:
        raise ValueError(
            f"{name} runs one stage per rank, but num_stages={num_stages} and "
            f"num_ranks={num_ranks}; use 'interleaved_1f1b' for several stages per rank"
        )
    ranks = num_stages if num_ranks is None else num_ranks
    stage_to_rank = tuple(s % ranks for s in range(num_stages))
    orders = [_GENERATORS[name](r, num_stages, num_micro_batch, ranks) for r in range(ranks)]
    actions = _place_p2p(orders, stage_to_rank, num_micro_batch)
    return Schedule(name, num_stages, num_micro_batch, stage_to_rank, actions)


def _place_p2p(
    orders: list[_Order], stage_to_rank: tuple[int, ...], num_micro_batch: int
) -> tuple[tuple[Action, ...], ...]:
    """Insert sends/receives into per-rank compute orders, deadlock-free under blocking p2p.

    Runs the compute orders with unit costs in the simulator's :func:`~.simulator.run_orders`,
    then sorts every compute (at its start) and every send/receive pair (at the end of the
    compute that produced the tensor) into one global order; each rank's list is its part of
    that order. Executing the global order event by event never finds a send without its receive
    at the head of the peer's list, so rendezvous p2p cannot deadlock, and every receive sits
    before the compute that needs it.
    """
    num_stages = len(stage_to_rank)
    run = run_orders(
        orders,
        stage_to_rank,
        num_micro_batch,
        [_PLACEMENT_FORWARD] * num_stages,
        [_PLACEMENT_BACKWARD] * num_stages,
        [0] * (num_stages - 1),
    )
    events: list[tuple[tuple[float, int, int, int, int], list[tuple[int, Action]]]] = []
    for rank, (order, starts) in enumerate(zip(orders, run.start)):
        for (forward, stage, micro_batch), start in zip(order, starts):
            action = Action(_F if forward else _B, stage, micro_batch)
            # At equal times a send/receive pair (0) goes before a compute (1).
            events.append(((start, 1, rank, 0, 0), [(rank, action)]))
            peer = stage + 1 if forward else stage - 1
            if 0 <= peer < num_stages and stage_to_rank[peer] != rank:
                end = start + (_PLACEMENT_FORWARD if forward else _PLACEMENT_BACKWARD)
                send = Action(_SA if forward else _SG, stage, action.micro_batch)
                events.append(
                    (
                        (end, 0, stage, int(not forward), action.micro_batch),
                        [(rank, send), (stage_to_rank[peer], send.matching())],
                    )
                )
    lists: list[list[Action]] = [[] for _ in orders]
    for _, placed in sorted(events, key=lambda event: event[0]):
        for rank, action in placed:
            lists[rank].append(action)
    return tuple(tuple(rank_list) for rank_list in lists)
