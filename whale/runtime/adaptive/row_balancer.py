"""Deciding, from measured compute times, how many batch rows each replica should take.

Pure logic, no communication: :class:`RowBalancer` is fed every replica's compute seconds and
rows per step (the same numbers on every rank, after one exchange) and answers the rows of the
next steps. Every rank that feeds it the same numbers gets the same answer, so the ranks agree
on the split without another collective.

* Speed is estimated per replica as the median of its last ``window`` per-row costs (seconds per
  row of a step's forward and backward), so one step stretched by a noisy neighbour moves
  nothing, while a lasting change (a device slowing down) wins the median after
  ``window // 2 + 1`` steps. Nothing moves before the window is full.
* The proposed split is proportional to speed (the replicas then finish together), with at
  least ``minimum`` rows each (one per micro-batch).
* Hysteresis: rows move only when the predicted step time (the slowest replica's rows times its
  cost) drops by more than ``threshold`` plus the scatter of the costs (:meth:`RowBalancer.noise`);
  near balance, noise leaves the split alone, and a noisier host asks for a clearer gain.

Example::

    balancer = RowBalancer(2, window=1, threshold=0.05, minimum=1)
    balancer.observe([0.10, 0.20], [8, 8])        # replica 1 takes twice as long per row
    balancer.propose((8, 8))                     # (11, 5): predicted 0.14 s, not 0.2 s
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Sequence

from ...ir.rows import split_rows

__all__ = ["RowBalancer", "rows_for_speeds"]


def rows_for_speeds(total: int, speeds: Sequence[float], minimum: int = 1) -> tuple[int, ...]:
    """``total`` rows in proportion to ``speeds``, at least ``minimum`` each.

    Largest remainders (:func:`~whale.ir.rows.split_rows`); a replica whose share falls below
    ``minimum`` is held at it and the others share the rest, again in proportion.

    Example::

        >>> rows_for_speeds(12, [2.0, 1.0])
        (8, 4)
        >>> rows_for_speeds(12, [20.0, 1.0], minimum=3)
        (9, 3)

    Raises:
        ValueError: ``total`` is less than ``minimum`` rows per replica, or a speed is not > 0.
    """
    n = len(speeds)
    if any(not (s > 0 and math.isfinite(s)) for s in speeds):
        raise ValueError(f"rows_for_speeds: speeds must be finite numbers > 0, got {list(speeds)}")
    if total < n * minimum:
        raise ValueError(
            f"a batch of {total} rows cannot give each of {n} replicas {minimum} rows (one per "
            f"micro-batch); use a global batch of at least {n * minimum} rows"
        )
    held: dict[int, int] = {}
    while True:
        free = [i for i in range(n) if i not in held]
        share = split_rows(total - minimum * len(held), [speeds[i] for i in free])
        low = [i for i, r in zip(free, share) if r < minimum]
        if not low:
            rows = dict(held)
            rows.update(zip(free, share))
            return tuple(rows[i] for i in range(n))
        for i in low:
            held[i] = minimum


class RowBalancer:
    """Smoothed per-replica speeds and the row split they call for, with hysteresis.

    Args:
        num_replicas: data-parallel replicas.
        window: per-row costs per replica whose median is its cost estimate.
        threshold: the least relative drop of the predicted step time that moves rows, on top
            of the costs' scatter (:meth:`noise`).
        minimum: the least rows per replica (the micro-batch count).

    ``moves`` lists every accepted change as ``(observed_steps, old_rows, new_rows, gain)``.
    """

    def __init__(self, num_replicas: int, *, window: int, threshold: float, minimum: int = 1) -> None:
        if num_replicas < 1 or window < 1 or not 0 <= threshold < 1 or minimum < 1:
            raise ValueError(
                f"RowBalancer({num_replicas}, window={window}, threshold={threshold}, "
                f"minimum={minimum}): need replicas, window and minimum >= 1 and 0 <= threshold < 1"
            )
        self.num_replicas = num_replicas
        self.window = window
        self.threshold = threshold
        self.minimum = minimum
        self._costs = [collections.deque(maxlen=window) for _ in range(num_replicas)]
        self.steps_observed = 0
        self.moves: list[tuple[int, tuple[int, ...], tuple[int, ...], float]] = []

    def observe(self, seconds: Sequence[float], rows: Sequence[int]) -> None:
        """One step: each replica's compute seconds (forward and backward) and its rows."""
        if len(seconds) != self.num_replicas or len(rows) != self.num_replicas:
            raise ValueError(
                f"observe(): {len(seconds)} times and {len(rows)} row counts for "
                f"{self.num_replicas} replicas"
            )
        for costs, t, r in zip(self._costs, seconds, rows):
            if r > 0 and t > 0 and math.isfinite(t):
                costs.append(t / r)
        self.steps_observed += 1

    def costs(self) -> tuple[float, ...] | None:
        """Seconds per row of each replica (median of its window), None until every replica's
        window is full (so the first move waits for ``window`` steps, not one noisy step)."""
        if any(len(c) < self.window for c in self._costs):
            return None
        return tuple(statistics.median(c) for c in self._costs)

    def noise(self) -> float:
        """How uncertain the cost estimates are: the largest relative standard error of a
        replica's window median, ``1.86 * MAD / sqrt(window)`` over the median (for normal
        scatter, sd = 1.4826 MAD and the median's standard error is 1.2533 sd / sqrt(n));
        0 before the windows are full. A move must gain this much more than ``threshold``: on a
        noisy host rows then move only for a clear gain, while a lasting change, once it holds
        most of a window, scatters little."""
        if any(len(c) < self.window for c in self._costs):
            return 0.0
        spread = 0.0
        for costs in self._costs:
            mid = statistics.median(costs)
            spread = max(spread, statistics.median(abs(c - mid) for c in costs) / mid)
        return 1.86 * spread / math.sqrt(self.window)

    def speeds(self) -> tuple[float, ...] | None:
        """Rows per second of each replica, None until every replica's window is full."""
        costs = self.costs()
        return None if costs is None else tuple(1.0 / c for c in costs)

    def predicted_time(self, rows: Sequence[int]) -> float | None:
        """The step's compute time for ``rows`` per replica: the slowest replica's."""
        costs = self.costs()
        return None if costs is None else max(r * c for r, c in zip(rows, costs))

    def propose(self, rows: Sequence[int]) -> tuple[int, ...] | None:
        """New rows for a step of ``sum(rows)`` rows now split as ``rows``, or None to keep them
        (no full window yet, or a predicted gain of at most ``threshold`` plus :meth:`noise`)."""
        speeds = self.speeds()
        if speeds is None:
            return None
        rows = tuple(rows)
        new = rows_for_speeds(sum(rows), speeds, self.minimum)
        if new == rows:
            return None
        now, then = self.predicted_time(rows), self.predicted_time(new)
        gain = 1.0 - then / now
        if gain <= self.threshold + self.noise():
            return None
        self.moves.append((self.steps_observed, rows, new, gain))
        return new
