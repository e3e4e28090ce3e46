"""A lower bound on a pipeline replica's simulated step time, from its stage times alone.

It rests on two facts of every schedule's compute orders (``gpipe``, ``1f1b``,
``interleaved_1f1b``; ``tests/test_search.py`` checks them): position ``r`` first runs the forward
of stage ``r`` on micro-batch 0, and last runs a backward of stage ``r``. So with ``f_j``,
``b_j`` one micro-batch's forward and backward of stage ``j``, ``x_j`` the transfer after it,
``F_r = sum_{j<r} (f_j + x_j)``, ``B_r = sum_{j<r} (b_j + x_j)`` and ``W_r`` the ``m``
micro-batches of position ``r``'s own stages, position ``r`` is busy until at least
``F_r + W_r``, and position 0 until at least ``F_r + W_r + B_r`` (the last gradient goes back
through the stages before ``r``). The replica's time adds to a position's finish the part of its
gradient all-reduce ``y_r`` that outlasts its last backward, and its optimizer step ``o_r``:

    T >= max_r max(F_r + W_r + max(0, y_r - b_r) + o_r,  F_r + W_r + B_r + max(0, y_0 - b_0) + o_0)

:func:`replica_floor` evaluates it without running the schedule (a few sums where the flow shop
walks ``2 m s`` computes): the search's exact climbs skip a move whose floor already reaches the
best move found (:meth:`~.climbs.Climbs.climb`), so they pick the same moves as before while
simulating a fraction of them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["floor_of_terms", "replica_floor", "terms_of_lists"]


def replica_floor(
    forward: Sequence[float],
    backward: Sequence[float],
    p2p: Sequence[float],
    opt: Sequence[float],
    sync: Sequence[float],
    num_micro_batch: int,
    num_ranks: int,
) -> float:
    """A lower bound on the simulated time of one replica with these stage times (no simulation).

    Example::

        replica_floor([1.0] * 4, [2.0] * 4, [0.0] * 3, [0.0] * 4, [0.0] * 4, 8, 4)   # 33.0, exact
    """
    work, first_f, first_b, first_p2p = terms_of_lists(forward, backward, p2p, num_ranks)
    return floor_of_terms(work, first_f, first_b, first_p2p, opt, sync, num_micro_batch)


def terms_of_lists(
    forward: Sequence[float], backward: Sequence[float], p2p: Sequence[float], num_ranks: int
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """What :func:`floor_of_terms` reads of per-stage lists: per position its stages' forward
    plus backward (summed in stage order), its first stage's forward and backward, and the
    transfer after that stage."""
    p = num_ranks
    both = [f + b for f, b in zip(forward, backward)]
    work = tuple(sum(both[r::p]) for r in range(p))  # the same additions in the same order as per stage
    return work, tuple(forward[:p]), tuple(backward[:p]), tuple(p2p[:p])


def floor_of_terms(
    work: Sequence[float],
    forward: Sequence[float],
    backward: Sequence[float],
    p2p: Sequence[float],
    opt: Sequence[float],
    sync: Sequence[float],
    num_micro_batch: int,
) -> float:
    """:func:`replica_floor` from what it reads of the stages
    (:meth:`~.stage_times.StageTimes.floor_terms`): per position ``r`` of ``p = len(work)``, one
    micro-batch's forward plus backward of its stages (``work[r]``), its first stage's
    ``forward[r]`` and ``backward[r]``, and the transfer after that stage (``p2p[r]``, for ``r``
    below the last stage)."""
    m = num_micro_batch
    tail0 = sync[0] - backward[0]
    tail0 = (tail0 if tail0 > 0.0 else 0.0) + opt[0]  # noqa: FURB136 (max(0.0, x) without the call)
    best, ahead, behind = 0.0, 0.0, 0.0
    for r in range(len(work)):
        end = ahead + m * work[r]
        exposed = sync[r] - backward[r]
        best = max(best, end + (exposed if exposed > 0.0 else 0.0) + opt[r], end + behind + tail0)  # noqa: FURB136
        if r < len(p2p):
            ahead += forward[r] + p2p[r]
            behind += backward[r] + p2p[r]
    return best
