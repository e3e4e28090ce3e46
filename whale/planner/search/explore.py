"""The search engine: screen structures in order of their lower bound, refine the best exactly.

The structures (degrees, layout, schedule, micro-batches) and their lower bounds come from
:mod:`~.space`. Structures are screened in order of that bound:

1. with few ways to cut, every cut is screened; otherwise layers are partitioned over the
   stages (:func:`~.balance.partition_layers`) per kind of pipeline, for all kinds pooled as
   Whale's virtual devices, and with the least memory, and interleaved ranks are balanced as
   wholes (:func:`~.balance.partition_ranks`: a rank's chunks share its time and memory);
   near the memory wall, cuts that all overflow are moved until one fits (the exact memory
   count); pipelines of few stages then move cuts while the estimate improves, by 1, 2, 4, ...
   layers (:meth:`~.climbs.Climbs.descend`);
2. rows go to replicas by a line through two evaluations of each kind's time, capped by memory
   (:func:`~.balance.balance_rows`);
3. the pipeline time (the schedule itself when it is short, else a closed form) scores it.

Screening stops when the next bound exceeds the best score: the best estimate, or the exact
time of the structure with the best estimate so far, which is refined as soon as it leads
(refining often finds it faster than estimated). Structures are then re-scored
exactly, best estimates first, while an estimate is within ``refine_margin`` of the best exact
time (and the best of every other shape, for ``explain``): rows rebalanced against the
simulated schedule, cuts tried exhaustively when there are few, else climbed (moves in runs
too) from the screened cuts and from every balanced partition, and
the whole plan predicted by :meth:`~.predict.CostModel.predict`. Pins (:mod:`~.pins`) restrict
every step.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from ...ir.rows import split_rows
from ..cost.predict import Candidate, Prediction
from ..schedules.flow_shop import peak_held
from .balance import balance_rows, partition_layers, partition_ranks
from .climbs import Climbs
from .space import SearchSettings, Structure, describe, no_structure_error

__all__ = ["Explorer", "NoPlanError", "Scored", "SearchResult", "SearchSettings", "describe"]

_GiB = 2**30

class NoPlanError(ValueError):
    """No plan fits: the message names the closest plan and what memory it lacks where.

    The message may be a function that writes it, called when the message is first read: the
    search finds the closest plan only for an error that is shown (the plain search's, which
    the memory options usually answer, is not; finding it took 0.8 s of a 1,024-GPU plan).
    """

    def __init__(self, message: str | Callable[[], str]) -> None:
        super().__init__()
        self._message = message

    def __str__(self) -> str:
        if callable(self._message):
            self._message = self._message()
            self.args = (self._message,)
        return self._message

    def __reduce__(self):
        return type(self), (str(self),)


@dataclasses.dataclass(frozen=True)
class Scored:
    """A candidate and its exact prediction."""

    candidate: Candidate
    prediction: Prediction


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The winner, the best plan of each other shape, and what the search did."""

    best: Scored
    alternatives: tuple[Scored, ...]
    overflows: tuple[Scored, ...]
    """Shapes with no plan that fits, each with the candidate that comes closest."""
    num_structures: int
    num_screened: int
    seconds: float
    global_batch: int



class Explorer(Climbs):
    """One search: screen structures in order of their bound, refine the best, explain the rest."""

    def screen(self, st: Structure) -> tuple[float, tuple[int, ...], tuple[int, ...]] | None:
        """(estimated step time, cuts, rows) of a structure, or None if it does not fit.

        Memoised: a group's least-memory structure is screened to see whether the group fits
        (:meth:`_group_fits`) and again in bound order."""
        found = self._screens.get(id(st))
        if found is None or found[0] is not st:
            found = self._screens[id(st)] = (st, self._screen(st))
        return found[1]

    def _screen(self, st: Structure) -> tuple[float, tuple[int, ...], tuple[int, ...]] | None:
        layout, s, m = st.layout, st.num_stages, st.num_micro_batch
        classes = self.classes(layout)
        allowed = [k for k in range(1, self.n) if self.cuttable[k]]
        balanced = False
        if s == 1:
            options = [()]
        elif self.pins.cuts is not None:
            options = [self.pins.cuts]
        elif math.comb(len(allowed), s - 1) <= self.settings.screen_cuts:
            # Few ways to cut: look at them all. Balanced cuts can be far off when few
            # micro-batches make fill, drain and the gradient all-reduce weigh more than the
            # slowest stage, and a structure estimated too high is never refined.
            options = list(itertools.combinations(allowed, s - 1))
        else:
            options, balanced = self.partitions(st, classes, self.batch / (layout.dp_degree * m)), True
        best = None
        for cuts in options:
            found = self.rows_and_time(layout, classes, s, st.schedule, m, cuts, exact=False)
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], cuts, found[1])
        if best is None and balanced and options and s <= self.settings.climb_stages:
            # Near the memory wall every balanced cut may overflow: move cuts until one fits.
            cuts = self.repair(st, classes, options)
            found = None if cuts is None else self.rows_and_time(layout, classes, s, st.schedule, m, cuts, exact=False)
            best = None if found is None else (found[0], cuts, found[1])
        if best is not None and balanced and s <= self.settings.climb_stages:
            # Few stages: the bottleneck is not the whole objective (fill, drain, transfers and
            # the gradient all-reduce count too), so move cuts while the estimate improves. Every
            # structure climbs: one whose balanced cuts are poor is estimated high, and would
            # not be refined if only structures already close to the best climbed.
            step, rows, cuts = self.climb(layout, classes, st, best[1], best[0], best[2], exact=False)
            best = (step, cuts, rows)
        return best

    def partitions(self, st: Structure, classes, q: float) -> list[tuple[int, ...]]:
        """Balanced cuts to screen a structure with, when there are too many ways to cut to try all.

        Cuts balanced for each kind of pipeline, for all kinds pooled (Whale's virtual devices),
        and pooled with the least memory (one row per micro-batch), which a slow kind that will
        get few rows may need.
        """
        layout, s, m = st.layout, st.num_stages, st.num_micro_batch
        options = []
        groups = [([c], q) for c in classes[:2]] + ([(classes, q)] if len(classes) > 1 else [])
        v = s // layout.pipeline_degree
        least = [(classes, 1.0)] + ([([c], 1.0) for c in classes[:2]] if len(classes) > 1 else [])
        for k, (pipes, rows) in enumerate(groups + least):
            if k >= len(groups) and (q <= 1.0 or len(options) == len(groups) * (2 if v > 1 else 1)):
                break  # every nominal partition fitted: the least-memory ones add nothing
            times, mems, caps, ends = self.stage_prefixes(pipes, s, st.schedule, m, rows)
            # A rank's stages share its memory: give each its share, or (uneven chunks)
            # all of it, and let the exact memory check decide.
            for share in (1, v) if v > 1 else (1,):
                key = (id(times), share)
                if key not in self._partitions:
                    self._partitions[key] = partition_layers(
                        times, mems, [c * share for c in caps], self.cuttable, end_cost=ends, rel_tol=1e-3
                    )
                cuts = self._partitions[key]
                if cuts is not None and cuts not in options:
                    options.append(cuts)
            # A rank's chunks share its time and memory: balance ranks, not chunks (few stages;
            # in long pipelines chunks are short and balancing them balances ranks).
            if v > 1 and s <= self.settings.climb_stages:
                key = (id(times), "ranks")
                if key not in self._partitions:
                    ranks = [j % layout.pipeline_degree for j in range(s)]
                    chunk_mems = self.chunk_memory(pipes, s, st.schedule, m, rows) or mems
                    self._partitions[key] = partition_ranks(times, ranks, chunk_mems, caps, self.cuttable, end_cost=ends)
                cuts = self._partitions[key]
                if cuts is not None and cuts not in options:
                    options.append(cuts)
        return options

    def chunk_memory(self, pipes, s: int, schedule: str, m: int, q: float) -> list[np.ndarray] | None:
        """Per stage, memory prefix sums that add up to at least each rank's exact peak.

        An interleaved rank holds different counts of its chunks' micro-batches at its peak;
        weighting each chunk's activations by its own most-held count bounds the peak from
        above, sum by sum. Short schedules only (their orders are cheap to generate, as in
        :meth:`~.predict.CostModel.replica_cost`); None otherwise.
        """
        p = len(pipes[0][0])
        if s * m > 512:
            return None
        q = 2 ** (math.ceil(math.log2(q) * 4) / 4)  # as stage_prefixes rounds it
        held = [peak_held(schedule, p, m, [float(j // p == c) for j in range(s)]) for c in range(s // p)]
        out = []
        for j in range(s):
            pos = j % p
            arrays = [self._group_arrays(pipe[pos], q) for pipe, _ in pipes]
            out.append(np.max([state + act * math.ceil(q) * held[j // p][pos] for _, state, act, _, _ in arrays], axis=0))
        return out

    def _group_fits(self, st: Structure, least: Structure) -> bool:
        """Whether the least-memory structure of ``st``'s group fits (screened once per group).

        Held activations are ``min(m, p - r) ceil(rows / m)`` micro-batch rows under 1F1B (and
        ``m ceil(rows / m)`` under GPipe): smallest at ``m = rows``, one row per micro-batch.
        That holds when every replica gets exactly ``m`` rows of the least-memory structure.
        Otherwise there is no shortcut: with kinds of replicas of different memory, fewer
        micro-batches let the larger ones take more rows; and when the batch does not divide
        evenly, a replica with ``m + 1`` rows holds two rows per micro-batch at ``m`` but fewer
        at ``m = 1`` under GPipe.
        """
        key = _group(st)
        if len(self.classes(st.layout)) > 1 or least.num_micro_batch * st.layout.dp_degree != self.batch:
            return True
        if key not in self._unfit:
            self._unfit[key] = self.screen(least) is None
        return not self._unfit[key]

    def rows_and_time(self, layout, classes, s, schedule, m, cuts, *, exact: bool, guess=None):
        """Rows per replica (min-max over classes of replicas) and the resulting step time.

        Exact: each class's time is its simulated schedule. Screening: a line through two row
        counts per class (pipeline times are close to affine in rows), capped by memory.
        """
        costs = self.costs
        sync = self.sync(layout, s, cuts)
        counts = [c for _, c in classes]

        # Short schedules are cheap to run: screen them with the flow shop too.
        run = exact or s * m <= self.settings.simulate_below

        def cost(k: int, rows: int):
            return self.replica(classes[k][0], s, schedule, m, cuts, rows, sync, exact=run)

        if self.pins.row_weights is not None:
            rows = split_rows(self.batch, self.pins.row_weights)
            times = [costs.replica_cost(pipe, s, schedule, m, cuts, r, sync, exact=exact).time
                     for pipe, r in zip(layout.pipelines, rows)]  # fmt: skip
            return (max(times), rows) if all(math.isfinite(x) and r >= m for x, r in zip(times, rows)) else None
        if exact:
            def time_of(k, r):
                return cost(k, r).time
        else:
            # Screening: each class's time as a line through two row counts within what its
            # memory allows (a pipeline's time is close to affine in its rows).
            nominal = m * max(1, int(self.batch / (len(layout.pipelines) * m)))
            lines = []
            for k in range(len(classes)):
                a = cost(k, nominal)
                if a.row_limit < m:
                    return None
                r1 = int(min(nominal, a.row_limit))
                a = a if r1 == nominal else cost(k, r1)
                r2 = int(min(2 * r1, a.row_limit))
                r2 = r2 if r2 > r1 else max(m, r1 // 2)
                b = cost(k, r2) if r2 != r1 else a
                limit = a.row_limit
                if not math.isfinite(a.time):
                    return None  # rows within its memory limit, and still no time: it cannot run
                if not math.isfinite(b.time):  # r2 rows do not fit after all: below them, through a
                    limit, r2 = min(limit, max(r1, r2 - 1)), r1
                slope = (b.time - a.time) / (r2 - r1) if r2 != r1 else a.time / r1
                lines.append((slope, a.time - slope * r1, limit))

            def time_of(k, r):
                slope, icpt, limit = lines[k]
                return slope * r + icpt if r <= limit else math.inf

        per_class = balance_rows(self.batch, counts, time_of, minimum=m, guess=guess)
        if per_class is None:
            return None
        if exact:
            step = max(cost(k, max(rows)).time for k, rows in enumerate(per_class))
        else:
            step = max(time_of(k, max(rows)) for k, rows in enumerate(per_class))
        if not math.isfinite(step):
            return None
        queues = [list(rows) for rows in per_class]
        self.classes(layout)
        class_of = self._classes[id(layout)][1]
        return step, tuple(queues[class_of[d]].pop() for d in range(len(layout.pipelines)))

    def refine(self, st: Structure, cuts: tuple[int, ...], rows: tuple[int, ...]) -> Scored | None:
        """Exact rows for the structure, and (few stages) the best cuts: all of them when there are
        few, else climbs from the screened cuts and from each balanced partition."""
        layout, s, m = st.layout, st.num_stages, st.num_micro_batch
        classes = self.classes(layout)
        class_of = self._classes[id(layout)][1]
        guess = [max(r for d, r in enumerate(rows) if class_of[d] == k) for k in range(len(classes))]
        found = self.rows_and_time(layout, classes, s, st.schedule, m, cuts, exact=True, guess=guess)
        if found is None:
            return None
        step, rows = found
        small = 1 < s <= self.settings.climb_stages and self.pins.cuts is None and s * m <= self.settings.simulate_below
        small = small and step <= self._best_exact * (1 + self.settings.refine_margin)
        allowed = [k for k in range(1, self.n) if self.cuttable[k]]
        if small and math.comb(len(allowed), s - 1) <= self.settings.exhaustive_cuts:
            # Few ways to cut: try them all (fill, drain and transfers make the time non-convex).
            for trial_cuts in itertools.combinations(allowed, s - 1):
                trial = self.rows_and_time(layout, classes, s, st.schedule, m, trial_cuts, exact=True, guess=guess)
                if trial is not None and trial[0] < step * (1 - 1e-9):
                    step, rows, cuts = trial[0], trial[1], trial_cuts
        elif small:
            # Memory walls and fill/drain make the landscape rugged: climb from the screened cuts
            # and from every balanced partition of the structure, and keep the best summit.
            starts = [cuts] + [c for c in self.partitions(st, classes, self.batch / (layout.dp_degree * m)) if c != cuts]
            best = (step, rows, cuts)
            for start in starts:
                at = (step, rows) if start == cuts else self.rows_and_time(layout, classes, s, st.schedule, m, start, exact=True, guess=guess)
                if at is None:
                    continue
                found = self.climb(layout, classes, st, start, at[0], at[1], exact=True, guess=guess)
                if found[0] < best[0]:
                    best = found
            step, rows, cuts = best
        candidate = Candidate(layout, s, st.schedule, m, tuple(cuts), rows)
        return Scored(candidate, self.costs.predict(candidate))

    def run(self, cutoff: float = math.inf) -> SearchResult | None:
        """The search (module docstring).

        ``cutoff``: the step time of a plan found elsewhere (under other memory options): only
        plans faster than it are sought, structures whose bound reaches it are not screened,
        estimates above it by ``refine_margin`` are not refined, and None is returned where no
        plan beats it (nothing fits, or nothing is faster).
        """
        started = time.perf_counter()
        structures = self.structures()
        bounded = cutoff < math.inf
        if bounded and (not structures or structures[0].bound >= cutoff):
            return None
        if not structures and self.pruned:
            pruned = list(self.pruned)
            raise NoPlanError(lambda: self.shortfall_message(pruned))
        if not structures:
            raise no_structure_error(self.pins, self.cluster, self.batch, self.n)
        screened: list[tuple] = []
        best, count = cutoff, 0
        # Each new best estimate is refined at once: its exact time (often below the estimate)
        # stops the screening sooner, as no structure whose bound reaches it can beat it.
        best_estimate, refined = math.inf, {}
        self._best_exact = cutoff  # the best exact time so far, which refine reads too
        # Per layout, stage count and schedule, the structure that needs the least memory: the
        # most micro-batches (one row each). If it does not fit, no other micro-batch count does.
        least: dict = {}
        for st in structures:
            if _group(st) not in least or st.num_micro_batch > least[_group(st)].num_micro_batch:
                least[_group(st)] = st
        tried: dict[tuple, int] = {}
        for k, st in enumerate(structures):
            if st.bound > best:
                break
            count += 1
            tried[_shape_of(st)] = tried.get(_shape_of(st), 0) + 1
            if not self._group_fits(st, least[_group(st)]):
                continue
            found = self.screen(st)
            if found is not None:
                screened.append((found[0], k, st, found[1], found[2]))
                if found[0] < best_estimate:
                    best_estimate = found[0]
                    refined[k] = exact = self.refine(st, found[1], found[2])
                    if exact is not None and exact.prediction.fits:
                        self._best_exact = min(self._best_exact, exact.prediction.step_time)
                best = min(best_estimate, self._best_exact)
        if not screened and bounded:
            return None
        if not screened:
            every = sorted(structures + self.pruned, key=lambda x: x.bound)
            raise NoPlanError(lambda: self.shortfall_message(every))
        # For explain: screen the most promising structures of shapes the bound cut off (not
        # where a faster plan is known already: none of them would be shown).
        fitted = {_shape_of(x[2]) for x in screened}
        for k, st in enumerate([] if bounded else structures[count:], count):
            shape = _shape_of(st)
            if shape in fitted or tried.get(shape, 0) >= 3 or len(fitted) >= self.settings.finalists + self.settings.alternatives:
                continue
            tried[shape] = tried.get(shape, 0) + 1
            found = self.screen(st)
            if found is not None:
                screened.append((found[0], k, st, found[1], found[2]))
                fitted.add(shape)
        screened.sort(key=lambda x: (x[0], x[1]))
        # Refine in order of estimate: at least `finalists`, then while an estimate is within
        # `refine_margin` of the best exact time so far (estimates are approximate), and the
        # best of every other shape for explain.
        scored, shapes = [], set()
        for est, k, st, cuts, rows in screened:
            if est > cutoff * (1 + self.settings.refine_margin):
                break  # a plan found elsewhere is faster by the margin already
            promising = len(scored) < self.settings.finalists or (
                est <= self._best_exact * (1 + self.settings.refine_margin) and len(scored) < self.settings.max_finalists
            )
            if not promising and _shape_of(st) in shapes:
                continue
            shapes.add(_shape_of(st))
            found = refined.pop(k) if k in refined else self.refine(st, cuts, rows)
            if found is not None and found.prediction.fits:
                scored.append(found)
                self._best_exact = min(self._best_exact, found.prediction.step_time)
        # Those refined early that the order above passed over compete too.
        scored += [found for found in refined.values() if found is not None and found.prediction.fits]
        if not scored and bounded:
            return None
        if not scored:
            raise NoPlanError(lambda: self.shortfall_message(structures))
        scored.sort(key=lambda x: x.prediction.step_time)
        winner, others, seen = scored[0], [], {_shape(scored[0].candidate)}
        for x in scored[1:]:
            if _shape(x.candidate) not in seen and len(others) < self.settings.alternatives:
                seen.add(_shape(x.candidate))
                others.append(x)
        # Shapes tried, and those the memory floor dropped within the bound, that never fitted.
        cut_off = [st for st in self.pruned if st.bound <= best and _shape_of(st) not in fitted]
        unfit = [st for st in structures if _shape_of(st) in tried and _shape_of(st) not in fitted]
        unfit = sorted(unfit + cut_off, key=lambda x: x.bound)
        overflows = tuple(self.closest(unfit, limit=2))
        seconds = time.perf_counter() - started
        return SearchResult(winner, tuple(others), overflows, len(structures), count, seconds, self.batch)

    def closest(
        self, structures: Sequence[Structure], limit: int, *, every_layout: bool = False, nearest: bool = False
    ) -> list[Scored]:
        """Per shape (or layout), the candidate that comes closest to fitting, in bound order.

        ``nearest``: only the candidates that may come closest of all. One whose memory floor
        (:class:`~.memory_floor.MemoryFloor`, a lower bound on the bytes any plan of it lacks)
        exceeds the least shortfall already scored is skipped, so the closest is always kept.
        """
        most: dict[tuple, int] = {}
        for st in structures:
            most[_group(st)] = max(most.get(_group(st), 0), st.num_micro_batch)
        picks, seen = [], set()
        for st in structures:
            mark = _group(st) if every_layout else _shape_of(st)
            if mark in seen or len(picks) >= limit:
                continue
            seen.add(mark)
            picks.append((st, most[_group(st)]))

        def score(st: Structure, m: int) -> Scored:
            cuts = self.least_overflow_cuts(st.layout, st.num_stages, st.schedule, m)
            candidate = Candidate(st.layout, st.num_stages, st.schedule, m, cuts, _even_rows(self.batch, st.layout.dp_degree))
            return Scored(candidate, self.costs.predict(candidate))

        if not nearest or len(picks) <= 1:
            return [score(st, m) for st, m in picks]
        floors = [
            self.floor.excess(self.classes(st.layout), st.num_stages, st.schedule, m, self.batch, cuts=self.pins.cuts)
            for st, m in picks
        ]
        # Score the lowest floor first: its shortfall is usually the least, and skips the rest.
        first = min(range(len(picks)), key=floors.__getitem__)
        done = {first: score(*picks[first])}
        least = done[first].prediction.shortfall[0]
        out = []
        for k, (st, m) in enumerate(picks):
            if k not in done:
                if floors[k] > least:
                    continue
                done[k] = score(st, m)
                least = min(least, done[k].prediction.shortfall[0])
            out.append(done[k])
        return out

    # --- when nothing fits -------------------------------------------------------------------------

    def shortfall_message(self, structures: Sequence[Structure]) -> str:
        """Name the structure that comes closest to fitting, and what it lacks where."""
        every = len({(id(st.layout), st.num_stages, st.schedule) for st in structures}) <= 64
        close = min(self.closest(structures, len(structures), every_layout=every, nearest=True), key=lambda x: x.prediction.shortfall[0])
        missing, rank = close.prediction.shortfall
        device = self.device_of[rank]
        need, cap = close.prediction.rank_memory[rank], close.prediction.rank_capacity[rank]
        if missing <= 0:  # nothing is missing: the screen's estimates rejected a plan that fits
            return (
                f"the search found no plan that fits, yet {describe(close.candidate, self.cluster)} "
                f"fits when scored exactly ({need / _GiB:.1f} of {cap / _GiB:.1f} GiB usable on rank "
                f"{rank}, {device.name}): the search's estimates rejected it. Pin that shape (whale "
                "plan --pipeline-degree, --stages, --micro-batches, --schedule) to plan it, and "
                "report this model and cluster"
            )
        return (
            f"the model fits on no plan of this cluster: the closest ({describe(close.candidate, self.cluster)}) "
            f"needs {need / _GiB:.1f} GiB on rank {rank} ({device.name}), which has {cap / _GiB:.1f} GiB "
            f"usable ({self.costs.options.memory_fraction:.0%} of {device.memory_bytes / _GiB:.0f} GiB): "
            f"{missing / _GiB:.1f} GiB missing there. Add devices or devices with more memory, train "
            "in lower precision or with a lighter optimizer, or use a smaller global batch"
        )




def _shape(c: Candidate) -> tuple:
    return (c.layout.tensor_parallel, c.layout.pipeline_degree, c.num_stages, c.schedule)


def _group(st: Structure) -> tuple:
    return (id(st.layout), st.num_stages, st.schedule)


def _shape_of(st: Structure) -> tuple:
    return (st.layout.tensor_parallel, st.layout.pipeline_degree, st.num_stages, st.schedule)


def _even_rows(total: int, parts: int) -> tuple[int, ...]:
    q, r = divmod(total, parts)
    return tuple(q + (i < r) for i in range(parts))


