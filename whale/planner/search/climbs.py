"""Moving cuts: the search's climbs, their memoised exact scores, and repairs near the memory wall.

:class:`Climbs` is the part of :class:`~.explore.Explorer` that moves the cuts of one structure:
:meth:`~Climbs.climb` while the step time improves, :meth:`~Climbs.repair` until the cuts fit in
memory, both by :meth:`~Climbs.descend`'s steepest descent over moves of 1, 2, 4, ... layers.
Exact scores run the schedule; a move whose :func:`~.time_floor.replica_floor` (or, for memory,
the overflow of a first kind of replica) already reaches the best move found is not scored
further, which leaves every choice as it was.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from .space import SearchSpace, Structure
from .time_floor import floor_of_terms

__all__ = ["Climbs"]

# The stage arrays' memory can be far from the exact count (kinds of replicas pooled, a rank's
# peak spread evenly over its chunks): balanced cuts are repaired unless some rank needs more
# than twice its capacity, which no move of a few layers mends.
_NEAR_WALL = 1.0


class Climbs(SearchSpace):
    """Cut moves of a structure (mixed into :class:`~.explore.Explorer`, which scores rows)."""

    def replica(self, pipe, s: int, schedule: str, m: int, cuts, rows: int, sync, *, exact: bool):
        """:meth:`~.predict.CostModel.replica_cost`, memoised: climbs and repairs revisit cuts."""
        key = (pipe, s, schedule, m, tuple(cuts), rows, tuple(sync), exact)
        found = self._replica_memo.get(key)
        if found is None:
            if len(self._replica_memo) > 200_000:
                self._replica_memo.clear()
            found = self._replica_memo[key] = self.costs.replica_cost(pipe, s, schedule, m, cuts, rows, sync, exact=exact)
        return found

    def sync(self, layout, s: int, cuts):
        """:meth:`~.predict.CostModel.sync_time`, memoised: a climb scores the same cuts again."""
        key = (id(layout), s, tuple(cuts))
        found = self._sync_memo.get(key)
        if found is None:
            if len(self._sync_memo) > 200_000:
                self._sync_memo.clear()
            found = self._sync_memo[key] = self.costs.sync_time(layout, s, cuts)
        return found

    def replica_floor(self, pipe, s: int, m: int, cuts, rows: int, sync) -> float:
        """:func:`~.time_floor.replica_floor` of :meth:`replica`'s exact time, memoised (no schedule run)."""
        key = (pipe, s, m, cuts, rows, sync)
        found = self._floor_memo.get(key)
        if found is None:
            if len(self._floor_memo) > 200_000:
                self._floor_memo.clear()
            work, forward, backward, p2p, opt = self.costs.floor_terms(pipe, s, m, cuts, rows)
            found = self._floor_memo[key] = floor_of_terms(work, forward, backward, p2p, opt, sync, m)
        return found

    def climb(self, layout, classes, st: Structure, cuts, step, rows, *, exact: bool, guess=None):
        """Move cuts while the step time improves (:meth:`descend`'s moves).

        Moves are scored with the rows held fixed (one evaluation per kind of replica), except
        exact climbs over several kinds, whose rows are rebalanced per move; the rows are
        rebalanced once for the cuts the climb ends on.
        """
        s, m = st.num_stages, st.num_micro_batch
        class_of = self._classes[id(layout)][1]
        held_rows = [max(r for d, r in enumerate(rows) if class_of[d] == k) for k in range(len(classes))]
        least_rows = [min(r for d, r in enumerate(rows) if class_of[d] == k) for k in range(len(classes))]
        run = exact or s * m <= self.settings.simulate_below

        def slowest(trial, sync, bar: float, *, exact: bool, floors=None) -> float:
            # The slowest kind at its held rows. Once one kind reaches ``bar`` the move cannot
            # win (``descend``'s bounded score) and the rest are skipped: highest floors first.
            order = range(len(classes)) if floors is None else sorted(range(len(classes)), key=lambda k: -floors[k])
            worst = -math.inf
            for k in order:
                worst = max(worst, self.replica(classes[k][0], s, st.schedule, m, trial, held_rows[k], sync, exact=exact).time)
                if worst >= bar:
                    break
            return worst

        def time_at(trial: tuple[int, ...], bar: float = math.inf) -> float:
            if exact and len(classes) > 1:
                # Rows rebalanced for ``trial`` reach T only if some kind k runs its least rows
                # now within T (else every kind gets fewer and the batch is not covered): the
                # least such time bounds the step from below, and a move it rules out
                # (bound >= bar) is not rebalanced.
                sync = self.sync(layout, s, trial)
                bound = min(self.replica_floor(pipe, s, m, trial, r, sync) for (pipe, _), r in zip(classes, least_rows))
                if bound >= bar:
                    return bound
                # The least of the kinds' times: any under ``bar`` lets the move go on.
                bound = math.inf
                for (pipe, _), r in zip(classes, least_rows):
                    bound = min(bound, self.replica(pipe, s, st.schedule, m, trial, r, sync, exact=True).time)
                    if bound < bar:
                        break
                if bound >= bar:
                    return bound
                # Kinds of replicas trade rows: a cut may pay off only with its own rows.
                found = self.rows_and_time(layout, classes, s, st.schedule, m, trial, exact=True, guess=held_rows)
                return math.inf if found is None else found[0]
            sync = self.sync(layout, s, trial)
            floors = None
            if run and bar < math.inf:
                floors = [self.replica_floor(pipe, s, m, trial, r, sync) for (pipe, _), r in zip(classes, held_rows)]
                if max(floors) >= bar:
                    return max(floors)
            return slowest(trial, sync, bar, exact=run, floors=floors)

        start = tuple(cuts)
        if exact and len(classes) > 1:
            # Rebalancing rows per move is dear: climb with the rows held first (one schedule
            # per kind a move), then rebalance from the better of the two summits.
            def held_time(trial: tuple[int, ...], bar: float = math.inf) -> float:
                sync = self.sync(layout, s, trial)
                floors = None
                if bar < math.inf:
                    floors = [self.replica_floor(pipe, s, m, trial, r, sync) for (pipe, _), r in zip(classes, held_rows)]
                    if max(floors) >= bar:
                        return max(floors)
                return slowest(trial, sync, bar, exact=True, floors=floors)

            near = self.descend(start, held_time, runs=True, bounded=True)
            cuts = near if near != start and time_at(near) < time_at(start) else start
            # Runs of cuts were tried with the rows held: rebalanced moves are single cuts.
            cuts = self.descend(cuts, time_at, runs=True, bounded=True, singles=True)
        else:
            cuts = self.descend(cuts, time_at, runs=exact, bounded=True)
        if cuts == start:
            return step, rows, start
        found = self.rows_and_time(layout, classes, s, st.schedule, m, cuts, exact=exact, guess=guess or held_rows)
        if found is None or found[0] >= step:
            return step, rows, start
        return found[0], found[1], cuts

    def descend(self, cuts: tuple[int, ...], score, *, runs: bool, stop=None, bounded: bool = False, singles: bool = False) -> tuple[int, ...]:
        """Steepest descent on cuts: each cut moves 1, 2, 4, ... layers either way, and (``runs``)
        so does each run of neighbouring cuts, together, and each pair of cuts by 1 or 2 layers
        each; the best move is taken while ``score`` falls. Without ``runs`` (screening, where
        moves are many and cheap estimates suffice) the first, shortest move that helps is.

        Fill, drain, transfers and the gradient all-reduce make the step time of a cut
        non-convex in it, and memory walls cut the feasible set into islands: one-layer moves
        stop at the first ridge, longer ones step over it. ``stop(value)`` ends the search early.
        ``bounded``: ``score(cuts, bar)`` may return any value >= ``bar`` for cuts that cannot
        beat it (a lower bound that rules the move out). ``singles``: single-cut moves only.
        """
        steps = [1 << k for k in range(max(1, self.n.bit_length()))]
        moves = [((k,), d) for k in range(len(cuts)) for d in steps]
        if runs and not singles:
            moves += [(tuple(range(k, k + w)), d) for w in range(2, len(cuts) + 1) for k in range(len(cuts) - w + 1) for d in steps]
            # Two cuts by different amounts: islands a uniform move cannot reach.
            moves += [((i, j), (di, dj)) for i, j in itertools.combinations(range(len(cuts)), 2)
                      for di in (1, 2) for dj in (-2, -1, 1, 2) if di != dj]  # fmt: skip
        moves.sort(key=lambda move: max(move[1]) if isinstance(move[1], tuple) else move[1])
        current = score(cuts)
        while not (stop is not None and stop(current)):
            best, where = current, cuts
            for (which, dist), sign in itertools.product(moves, (-1, 1)):
                if not runs and where != cuts:
                    break  # screening: the first (shortest) move that helps
                moved = list(cuts)
                for i, d in zip(which, dist if isinstance(dist, tuple) else [dist] * len(which)):
                    moved[i] += sign * d
                if not _valid_cuts(moved, self.n, self.cuttable):
                    continue
                trial = score(tuple(moved), best) if bounded else score(tuple(moved))
                if trial < best and not _close(trial, current):
                    best, where = trial, tuple(moved)
            if where == cuts:
                break
            current, cuts = best, where
        return cuts

    def repair(self, st: Structure, classes, options: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
        """Cuts that fit in memory, moved from the balanced ones that do not.

        The stage arrays approximate a rank's held activations (an interleaved rank's peak is
        spread evenly over its chunks), so near the memory wall every balanced cut may
        overflow while a few nearby ones fit: move cuts to shrink the worst overflow (bytes
        over capacity, relative, on the fullest member of any replica kind) until it is gone.
        Cuts further over than ``_NEAR_WALL`` are not near the wall: nothing is tried. With
        few ways to cut, the islands are found by trying every cut's memory instead.
        """
        layout, s, m = st.layout, st.num_stages, st.num_micro_batch
        rows = max(m, self.batch // layout.dp_degree)
        q_max = -(-rows // m)
        capacity = self.costs.capacity
        caps = {pipe: [[capacity(r) for r in group] for group in pipe] for pipe, _ in classes}
        p = len(classes[0][0])  # positions of a replica
        # A position's bytes depend only on its own stages' layers (replica_memory): memoise
        # each position's worst overflow on its blocks, as a move changes one or two positions.
        positions: dict = {}

        def position_overflow(pipe, bounds: tuple[int, ...], pos: int) -> float:
            key = (pipe, pos, bounds[pos::p], bounds[pos + 1 :: p])
            found = positions.get(key)
            if found is None:
                blocks = tuple((bounds[k], bounds[k + 1]) for k in range(pos, s, p))
                found = self.costs.position_memory(pipe, pos, s, st.schedule, m, blocks, exact=False)
                need = [state + int(held * q_max) for held, state in found]  # the largest micro-batch held
                found = positions[key] = max(b / c - 1 for c, b in zip(caps[pipe][pos], need))
            return found

        def overflow(trial: tuple[int, ...], bar: float = math.inf) -> float:
            # Memory only (no times): replica_cost's memory half. The worst over kinds of
            # replica: once it reaches ``bar`` the move cannot win, and the rest are skipped.
            key = (trial, s, st.schedule, m, rows, id(layout))
            worst = self._memory_memo.get(key)
            if worst is None:
                worst = -math.inf
                bounds = (0, *trial, self.n)
                for pipe, _ in classes:
                    worst = max(worst, *(position_overflow(pipe, bounds, pos) for pos in range(p)))
                    if worst >= bar:
                        return worst
                self._memory_memo[key] = worst
            return worst

        start = min(options, key=overflow)
        if overflow(start) > _NEAR_WALL:
            return None
        allowed = [k for k in range(1, self.n) if self.cuttable[k]]
        if math.comb(len(allowed), s - 1) <= self.settings.exhaustive_cuts:
            # Few ways to cut (as refinement tries them all): every one that fits, the fastest.
            fits = [c for c in itertools.combinations(allowed, s - 1) if overflow(c) <= 0]
            timed = [(found[0], c) for c in fits if (found := self.rows_and_time(layout, classes, s, st.schedule, m, c, exact=False))]
            return min(timed)[1] if timed else None
        cuts = self.descend(start, overflow, runs=True, stop=lambda v: v <= 0, bounded=True)
        return cuts if overflow(cuts) <= 0 else None


def _valid_cuts(cuts: Sequence[int], n: int, cuttable: Sequence[bool]) -> bool:
    """Cuts strictly increasing inside ``(0, n)``, each where a stage may begin (one loop: the
    descent checks millions of moves)."""
    prev = 0
    for c in cuts:
        if c <= prev or c >= n or not cuttable[c]:
            return False
        prev = c
    return True


def _close(a, b) -> bool:
    """Equal up to float noise: a move must gain more than that to count."""
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


