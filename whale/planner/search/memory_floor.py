"""Memory lower bounds per structure: drop what cannot fit before screening it.

A plan of a structure (rank layout, stages, schedule, micro-batches) fits when every member of
every tensor-parallel group holds its stage's weights, gradients and optimizer states plus the
activations the schedule keeps. :class:`MemoryFloor` bounds that from below for *every* choice of
cuts and rows at once, so a structure it rejects has no plan that fits; nothing that fits is
ever dropped (``tests/test_memory_floor.py`` checks the bound against exact predictions).

The relaxation, per replica kind:

* a stage's memory is a prefix difference ``F[b] - F[a]`` of nondecreasing per-layer amounts
  (states, with a tied weight counted at its first user only, and activations times the rows a
  rank holds at least), so whether some cuts fit is a greedy question: each stage reaches as far
  as its members' memory allows, and the cuts exist only if the last stage reaches the end
  (any cuts that fit reach no further, stage by stage);
* rows: every replica has at least one row per micro-batch, and one replica has at least
  ``ceil(batch / dp)`` rows; under 1F1B rank ``r`` of ``p`` holds ``min(m, p - r)``
  micro-batches, under GPipe all ``m``; an interleaved rank holds at least one micro-batch of
  each of its chunks, and all its chunks' states (checked over the whole pipeline).

:meth:`MemoryFloor.excess` is the least bytes the relaxation misses by, a lower bound on what
the closest plan of the structure lacks.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence

import numpy as np

from ..cost.predict import CostModel

__all__ = ["MemoryFloor"]

# Exact memory rounds its state and activation terms down to whole bytes: allow that, and float
# noise in prefix sums, so that the bound never exceeds the exact figure.
_SLACK_BYTES = 2.0
_REL_TOL = 1e-9


class MemoryFloor:
    """Lower bounds on any plan's memory, for structures of one model on one cluster.

    Example::

        floor = MemoryFloor(costs, cuttable)
        floor.may_fit(classes, num_stages, "1f1b", num_micro_batch, global_batch)
    """

    def __init__(self, costs: CostModel, cuttable: Sequence[bool]) -> None:
        self.costs = costs
        self.n = costs.num_layers
        layers = costs.profile.layers
        # A tied weight counts at its first user only: a stage holding any later user alone
        # holds it too, so the prefix is below every stage's exact count.
        params = np.array([float(x.param_bytes) for x in layers])
        for _, size, users in costs.profile.shared_params:
            for u in sorted(users)[1:]:
                params[u] -= size
        self._params = np.concatenate([[0.0], np.cumsum(np.maximum(params, 0.0))])
        self._repl = np.asarray(costs.repl_params, dtype=float)
        self._act = np.asarray(costs.act, dtype=float)
        self._repl_act = np.asarray(costs.repl_act, dtype=float)
        self._per_param = costs.state_bytes_per_param
        # The last place a stage may begin at or before each layer (0: none), and the first at or
        # after it (n: none).
        places = [k for k in range(1, self.n) if cuttable[k]]
        self._last_cut = [max((c for c in places if c <= k), default=0) for k in range(self.n + 1)]
        self._next_cut = [min((c for c in places if c >= k), default=self.n) for k in range(self.n + 2)]
        self._prefix: dict = {}
        self._kinds: dict = {}
        self._memo: dict = {}

    def may_fit(self, classes, s: int, schedule: str, m: int, batch: int, *, cuts=None, key=None) -> bool:
        """False when no cuts and rows make a plan of this structure fit in memory.

        Args:
            classes: the layout's replica kinds, ``[(pipeline, count)]`` (``SearchSpace.classes``).
            s, schedule, m: stages, schedule, micro-batches.
            batch: the global batch.
            cuts: pinned cuts (None: any).
            key: a hashable name for ``classes``, to memoise on.
        """
        return self.excess(classes, s, schedule, m, batch, cuts=cuts, key=key, upto=0.0) <= 0.0

    def excess(self, classes, s: int, schedule: str, m: int, batch: int, *, cuts=None, key=None, upto=None) -> float:
        """A lower bound on the bytes the closest plan of the structure lacks (<= 0: it may fit).

        ``upto``: only whether the bound exceeds this is needed (a quick answer above it).
        """
        memo = None if key is None else (key, s, schedule, m, batch, cuts, upto)
        if memo is not None and memo in self._memo:
            return self._memo[memo]
        dp = sum(count for _, count in classes)
        big = _ceil_div(_ceil_div(batch, dp), m)  # rows per micro-batch of a replica with ceil(batch / dp) rows
        sets = [[(pipe, big if i == k else 1) for i, (pipe, _) in enumerate(classes)] for k in range(len(classes))]
        if big == 1:
            sets = sets[:1]
        v = s // len(classes[0][0])
        total = 0.0 if v == 1 else max(self._total_excess(pipe) for pipe, _ in classes)
        if upto is not None and total > upto:
            found = total
        else:
            # No set's excess is below -1 (fits, upto given) or 0 (fits): the first such is the least.
            least, lowest = math.inf, -1.0 if upto is not None else 0.0
            for c in sets:
                least = min(least, self._set_excess(c, s, schedule, m, cuts, upto))
                if least <= lowest:
                    break
            found = max(total, least)
        if memo is not None:
            self._memo[memo] = found
        return found

    # --- the relaxation ------------------------------------------------------------------------

    def _set_excess(self, constraints, s, schedule, m, cuts, upto) -> float:
        """Least slack (bytes added to every capacity) that lets the stages reach the last layer."""
        if self._reaches(constraints, s, schedule, m, cuts, 0.0):
            return 0.0 if upto is None else -1.0
        if upto is not None and (upto == 0.0 or not self._reaches(constraints, s, schedule, m, cuts, upto)):
            return upto + 1.0
        lo, hi = 0.0, 1.0
        while not self._reaches(constraints, s, schedule, m, cuts, hi):
            lo, hi = hi, hi * 4
        for _ in range(40):  # to a millionth or a byte
            mid = (lo + hi) / 2
            if self._reaches(constraints, s, schedule, m, cuts, mid):
                hi = mid
            else:
                lo = mid
            if hi - lo <= max(1.0, 1e-6 * hi):
                break
        return lo

    def _reaches(self, constraints, s, schedule, m, cuts, slack: float) -> bool:
        """Whether stages can cover every layer, each within its members' capacity plus ``slack``.

        ``[lo, hi]`` holds every place stage ``j`` can begin at (a superset): a stage reaches no
        further than from ``hi`` (memory only grows with layers), begins after the previous
        one's beginning, and needs some layer in ``[lo, hi]`` that fits on it alone.
        """
        if cuts is not None:
            return self._fits_cuts(constraints, s, schedule, m, cuts, slack)
        n, p = self.n, len(constraints[0][0])
        lo = hi = 0
        for j in range(s):
            pos = j % p
            held = _held(schedule, p, s // p, m, j)
            reach = n
            for pipe, q in constraints:
                for share, cap in self._members(pipe[pos]):
                    f, least = self._prefix_of(share, held * q)
                    room = cap + slack + _SLACK_BYTES + _REL_TOL * f[-1]
                    k = (hi - lo + 1).bit_length() - 1  # the least single layer in [lo, hi]
                    if min(least[k][lo], least[k][hi - (1 << k) + 1]) > room:
                        return False  # not one layer fits here
                    reach = min(reach, bisect.bisect_right(f, f[hi] + room, hi) - 1)
            if j == s - 1:
                return reach >= n
            lo, hi = self._next_cut[lo + 1], self._last_cut[min(reach, n - 1)]
            if lo > hi:
                return False
        return True

    def _fits_cuts(self, constraints, s, schedule, m, cuts, slack: float) -> bool:
        bounds, p = (0, *cuts, self.n), len(constraints[0][0])
        for j in range(s):
            pos = j % p
            held = _held(schedule, p, s // p, m, j)
            for pipe, q in constraints:
                for share, cap in self._members(pipe[pos]):
                    f, _ = self._prefix_of(share, held * q)
                    if f[bounds[j + 1]] - f[bounds[j]] > cap + slack + _SLACK_BYTES + _REL_TOL * f[-1]:
                        return False
        return True

    def _total_excess(self, pipe) -> float:
        """Interleaved: a rank holds all its chunks' states at once, so the model's states must fit
        in the pipeline's capacity; the bytes each member misses for that (<= 0: they may fit).

        A member holding ``share`` of the sharded widths keeps at least ``share`` of its stages'
        states, so position ``k`` holds at most ``cap / share`` of the model's state bytes.
        """
        room, weight = 0.0, 0.0
        for group in pipe:
            # The member with the least room per share of the model bounds the position.
            share, cap = min(self._members(group), key=lambda x: x[1] / max(x[0], 1e-30))
            room += cap / max(share, 1e-30)
            weight += 1 / max(share, 1e-30)
        need = self._per_param * float(self._params[-1])
        return (need - room) / weight - _SLACK_BYTES

    def _members(self, group: tuple[int, ...]) -> list[tuple[float, float]]:
        """Distinct (share, capacity) of a group's members."""
        if group not in self._kinds:
            shares = self.costs.shard_shares(group)
            self._kinds[group] = list(dict.fromkeys((w, float(self.costs.capacity(r))) for r, w in zip(group, shares)))
        return self._kinds[group]

    def _prefix_of(self, share: float, rows: float) -> tuple[list[float], list[list[float]]]:
        """A member's least memory of layers ``0..b-1`` (states and ``rows`` rows of activations)
        for every ``b``, and of each layer alone as a sparse table: ``least[k][i]`` is the least
        of layers ``i..i + 2**k - 1`` (any range's least in two lookups)."""
        key = (share, rows)
        if key not in self._prefix:
            state = self._params * share + self._repl * (1 - share)
            act = self._act * share + self._repl_act * (1 - share)
            f = np.maximum.accumulate(self._per_param * state + rows * act)
            least = [np.diff(f)]
            while 2 << (len(least) - 1) <= len(least[0]):
                half = 1 << (len(least) - 1)
                least.append(np.minimum(least[-1][:-half], least[-1][half:]))
            self._prefix[key] = (f.tolist(), [x.tolist() for x in least])
        return self._prefix[key]


@functools.lru_cache(maxsize=4096)
def _held(schedule: str, p: int, v: int, m: int, stage: int) -> int:
    """Micro-batches of ``stage`` its rank holds at least once (at its first backward, at the latest).

    1F1B: ``min(m, p - r)`` on rank ``r``; GPipe: all ``m``. Interleaved (Megatron-LM's order,
    :mod:`~..schedules.generate`): rank ``r`` runs ``min(m v, 2 (p - r - 1) + (v - 1) p + 1)``
    forwards before its first backward, chunk ``c`` in groups of ``p`` micro-batches in turn.
    """
    r, chunk = stage % p, stage // p
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(m, p - r)
    first = min(m * v, 2 * (p - r - 1) + (v - 1) * p + 1)
    return sum(1 for k in range(first) if (k // p) % v == chunk)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)

