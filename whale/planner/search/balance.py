"""Hardware-aware balancing (Whale, Jia et al. ATC'22, section 4): load follows device speed.

Inside a part:

* :func:`rows_by_speed` cuts batch rows (``replicate``) and :func:`shard_sizes_by_speed` shard
  widths (``split``) in proportion to device speed, under each device's memory: what a full
  device cannot hold moves to the others (water-filling), never silently dropped.
* :func:`balance_rows` is the exact version for replicas whose step time is any nondecreasing
  function of their rows (a pipeline's time is not proportional to its rows): it minimises the
  slowest replica's time.

Across parts:

* :func:`partition_layers` cuts a sequence of layers into contiguous stages on heterogeneous
  devices so that the slowest stage is as fast as possible and no stage overflows its device:
  a bisection on the bottleneck time with a greedy feasibility test, exact for contiguous
  partitions because a stage's time and memory only grow as it takes more layers. Which device
  group takes which stage is the caller's order (see :mod:`~.layouts`): early stages hold more
  micro-batches under 1F1B, so the order changes what fits.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["balance_rows", "partition_layers", "partition_ranks", "rows_by_speed", "shard_sizes_by_speed"]

# partition_layers runs its reachability on Python lists up to these layers and stages x layers
# (there a loop beats numpy's cost per call), on arrays above.
_LIST_LAYERS, _LIST_CELLS = 64, 2048


def _apportion(total: int, weights: Sequence[float], lows: Sequence[int], caps: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` within ``[lows, caps]`` (water-filling).

    The shares are ``clamp(lam * w_i, low_i, cap_i)`` for the ``lam`` that makes them add up to
    ``total`` (found by bisection: the sum only grows with ``lam``); then floors, and the rows
    left over go to the largest remainders among parts below their cap.
    """
    n = len(weights)
    bounded = [min(c, float(total)) for c in caps]

    def shares(lam: float) -> list[float]:
        return [min(max(lam * w, lo), c) for w, lo, c in zip(weights, lows, bounded)]

    lo, hi = 0.0, 1.0
    while sum(shares(hi)) < total:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(shares(mid)) < total:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    exact = shares(hi)
    rows = [max(lows[i], min(int(exact[i]), int(bounded[i]))) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-(exact[i] - rows[i]), i))
    while sum(rows) < total:
        for i in order:
            if sum(rows) < total and rows[i] < bounded[i]:
                rows[i] += 1
    while sum(rows) > total:  # float ties at the bounds: trim the largest overshoot
        i = max((j for j in range(n) if rows[j] > lows[j]), key=lambda j: rows[j] - exact[j])
        rows[i] -= 1
    return rows


def rows_by_speed(
    total: int,
    speeds: Sequence[float],
    capacity: Sequence[int] | None = None,
    *,
    minimum: int = 1,
    what: str = "replicas",
) -> tuple[int, ...]:
    """Rows per replica in proportion to ``speeds``, at most ``capacity[i]`` each.

    Args:
        total: rows of the global batch.
        speeds: relative speed per replica (rows per second), all > 0.
        capacity: most rows each replica's memory holds; None: unbounded.
        minimum: least rows per replica (the micro-batch count: one row per micro-batch).
        what: the parts' name in error messages.

    Example::

        >>> rows_by_speed(12, [3.0, 1.0])
        (9, 3)
        >>> rows_by_speed(12, [3.0, 1.0], capacity=[6, 100])   # the fast one is full
        (6, 6)

    Raises:
        ValueError: a speed <= 0; fewer than ``minimum`` rows fit on some replica; or the
            replicas together hold fewer than ``total`` rows (the message says how many).
    """
    n = len(speeds)
    if n == 0 or any(not (s > 0 and math.isfinite(s)) for s in speeds):
        raise ValueError(f"rows_by_speed: speeds must be finite numbers > 0, one per replica, got {list(speeds)}")
    caps = [math.inf] * n if capacity is None else [float(c) for c in capacity]
    if len(caps) != n:
        raise ValueError(f"rows_by_speed: {len(caps)} capacities for {n} {what}; give one each")
    short = [i for i in range(n) if caps[i] < minimum]
    if short:
        raise ValueError(
            f"rows_by_speed: {what} {short} hold {[int(caps[i]) for i in short]} rows, fewer than "
            f"the {minimum} each must take (one per micro-batch); use fewer micro-batches or more memory"
        )
    if total < n * minimum:
        raise ValueError(
            f"rows_by_speed: {total} rows cannot give each of {n} {what} {minimum} rows; use a "
            f"global batch of at least {n * minimum}"
        )
    if sum(caps) < total:
        raise ValueError(
            f"rows_by_speed: the {what} hold {int(sum(caps))} rows in memory but the batch has "
            f"{total}; {total - int(sum(caps))} rows do not fit. Use a smaller batch, more "
            "micro-batches or more devices"
        )
    return tuple(_apportion(total, list(speeds), [minimum] * n, caps))


def shard_sizes_by_speed(
    num_atoms: int, speeds: Sequence[float], capacity: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Atoms (heads, columns, experts) per shard in proportion to device speed, >= 1 each.

    Example::

        >>> shard_sizes_by_speed(12, [2.0, 1.0, 1.0])
        (6, 3, 3)
    """
    return rows_by_speed(num_atoms, speeds, capacity, minimum=1, what="shards")


def balance_rows(
    total: int,
    counts: Sequence[int],
    time_of: Callable[[int, int], float],
    *,
    minimum: int = 1,
    maximum: int | None = None,
    guess: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], ...] | None:
    """Rows per replica minimising the slowest replica's time; exact for monotone times.

    Replicas come in classes of identical ones (``counts[c]`` replicas of class ``c``);
    ``time_of(c, rows)`` is a class's time for ``rows`` rows, nondecreasing in ``rows``, and
    ``math.inf`` where they do not fit. A bisection on the time finds, for a time just below the
    optimum, the most rows each class can do within it; those rows are below some optimal
    allocation, and giving the remaining rows one at a time to the replica that would finish
    them soonest reaches it (min-max with monotone costs is solved exactly by that greedy).

    Args:
        total: rows to place.
        counts: replicas per class.
        time_of: a class's time for a number of rows.
        minimum: least rows per replica.
        maximum: most rows per replica (None: ``total``).
        guess: rows per replica of each class near the answer, to start the bisection.

    Returns:
        Per class, the rows of each of its replicas; None if ``total`` rows fit nowhere.

    Example::

        balance_rows(10, [1, 2], lambda c, r: r * (1.0 if c == 0 else 2.0))   # ((6,), (2, 2))
    """
    top = total - (sum(counts) - 1) * minimum
    top = top if maximum is None else min(top, maximum)
    n, classes = sum(counts), range(len(counts))
    if total < n * minimum or any(time_of(c, minimum) == math.inf for c in classes):
        return None
    if total == n * minimum:
        return tuple((minimum,) * cnt for cnt in counts)
    if len(counts) == 1:
        # Identical replicas: the slowest is the one with the most rows, so split evenly.
        q, r = divmod(total, n)
        rows = tuple(q + (i < r) for i in range(n))
        return (rows,) if time_of(0, rows[0]) < math.inf else None
    memo: dict[tuple[int, int], float] = {}

    def t(c: int, r: int) -> float:
        if r > top:
            return math.inf
        if (c, r) not in memo:
            memo[c, r] = time_of(c, r)
        return memo[c, r]

    def most_rows(c: int, limit: float) -> int:
        """The most rows class ``c`` does within ``limit`` (galloping from the guess)."""
        lo = minimum
        hi = top
        if guess is not None:
            g = min(max(guess[c], minimum), top)
            if t(c, g) <= limit:
                lo, step = g, 1
                while lo + step <= top and t(c, lo + step) <= limit:
                    lo, step = lo + step, step * 2
                hi = min(top, lo + step - 1)
            else:
                hi, step = g - 1, 1
                while hi - step >= minimum and t(c, hi - step + 1) > limit:
                    hi, step = hi - step, step * 2
                lo = max(minimum, hi - step + 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if t(c, mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    if sum(cnt * most_rows(c, math.inf) for c, cnt in enumerate(counts)) < total:
        return None
    lo = max(t(c, minimum) for c in classes)
    if guess is not None and sum(g * cnt for g, cnt in zip(guess, counts)) >= total:
        hi = max(t(c, min(max(g, minimum), top)) for c, g in zip(classes, guess))
    else:
        hi = max(t(c, most_rows(c, math.inf)) for c in classes)
    if sum(cnt * most_rows(c, lo) for c, cnt in enumerate(counts)) >= total:
        hi = lo
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        if sum(cnt * most_rows(c, mid) for c, cnt in enumerate(counts)) >= total:
            hi = mid
        else:
            lo = mid
    # Seed with what fits strictly below the optimum, then place the rest greedily.
    seed = [most_rows(c, lo) if t(c, minimum) <= lo < hi else minimum for c in classes]
    rows = [[seed[c]] * cnt for c, cnt in enumerate(counts)]
    left = total - sum(sum(r) for r in rows)
    if left < 0:
        rows = [[minimum] * cnt for cnt in counts]
        left = total - n * minimum
    heap = [(t(c, rows[c][i] + 1), c, i) for c in classes for i in range(counts[c])]
    heapq.heapify(heap)
    while left > 0:
        cost, c, i = heapq.heappop(heap)
        if cost == math.inf:
            return None
        rows[c][i] += 1
        left -= 1
        heapq.heappush(heap, (t(c, rows[c][i] + 1), c, i))
    return tuple(tuple(r) for r in rows)


def partition_layers(
    time_prefix: Sequence[Sequence[float]],
    memory_prefix: Sequence[Sequence[float]] | None = None,
    capacity: Sequence[float] | None = None,
    cuttable: Sequence[bool] | None = None,
    *,
    end_cost: Sequence[Sequence[float]] | None = None,
    rel_tol: float = 1e-6,
) -> tuple[int, ...] | None:
    """Cut layers ``0..n-1`` into ``len(time_prefix)`` contiguous stages, slowest stage fastest.

    Stage ``j`` running layers ``a..b-1`` takes ``time_prefix[j][b] - time_prefix[j][a]``
    (plus ``end_cost[j][b]``, e.g. sending what crosses the cut at ``b``) and needs
    ``memory_prefix[j][b] - memory_prefix[j][a]`` bytes of its ``capacity[j]``: each stage has
    its own device (speed) and its own activation count, so each has its own prefix sums.

    For a bottleneck ``T``, which ends each stage can reach is a dynamic program over stages:
    the best start for an end ``b`` is the latest reachable end before it, since a stage that
    starts later is never slower nor larger. (Taking the most layers per stage greedily is not
    enough once stages differ: a slow stage may be unable to take a layer a fast one could.)
    A bisection on ``T`` finds the smallest feasible bottleneck.

    Args:
        time_prefix: per stage, cumulative time of layers (``n + 1`` nondecreasing entries).
        memory_prefix: per stage, cumulative bytes of layers; None: memory is not limited.
        capacity: per stage, bytes available.
        cuttable: per layer, whether a stage may begin there (entry 0 is ignored).
        end_cost: per stage, a time added when it ends before layer ``b`` (``n + 1`` entries).
        rel_tol: relative precision of the bottleneck time.

    Returns:
        The first layer of stages ``1..``, or None if no partition fits in memory.

    Example::

        >>> fast, slow = [0, 1, 2, 3, 4], [0, 2, 4, 6, 8]   # 4 equal layers, speeds 2:1
        >>> partition_layers([fast, slow])
        (3,)
    """
    stages = len(time_prefix)
    n = len(time_prefix[0]) - 1
    if stages < 1 or n < stages:
        return None
    times = np.asarray(time_prefix, dtype=float)
    mems = np.asarray(memory_prefix, dtype=float) if memory_prefix is not None else None
    caps = np.asarray(capacity, dtype=float) if capacity is not None else None
    ends = np.asarray(end_cost, dtype=float) if end_cost is not None else np.zeros((stages, n + 1))
    index = np.arange(n + 1)
    allowed = np.ones(n + 1, dtype=bool)
    if cuttable is not None:
        allowed[1:n] = np.asarray(cuttable, dtype=bool)[1:n]

    # parents[j][b] is one more than stage j's start for an end b: the latest end before b
    # that the stages before reach, 0 if none. The rows read at a start carry a NaN first (no
    # start), which every comparison rejects; the rows read at an end have NaN where no stage
    # may begin (all stages but the last). Reachable ends get the plain formula's sums and
    # comparisons, so the same cuts.
    end_time = times + np.where(allowed, 0.0, np.nan)
    end_time[-1] = times[-1]
    end_time, end_of, start_time = list(end_time), list(ends), list(_nan_first(times))
    if mems is not None:
        end_mem, start_mem, cap_of = list(mems), list(_nan_first(mems)), caps.tolist()
    after = index[1:]

    def solve_arrays(limit: float) -> list[int] | None:
        parents = np.empty((stages, n + 1), dtype=index.dtype)
        parents[:, 0] = 0
        parents[0, 1:] = 1  # stage 0 starts at layer 0
        reach = None
        for j in range(stages):
            a = parents[j]
            if reach is not None:
                np.maximum.accumulate(reach[:-1] * after, out=a[1:])
                if not a[n]:
                    return None  # no end before the last layer is reachable: nothing further is
            reach = end_time[j] - start_time[j][a]
            reach += end_of[j]
            reach = reach <= limit
            if mems is not None:
                reach &= end_mem[j] - start_mem[j][a] <= cap_of[j]
        if not reach[n]:
            return None
        return _backtrack(parents, n, stages, shift=1)

    # Plain lists where the stages x layers are few (up to 64 layers, 2,048 in all): there a Python loop beats
    # numpy's cost per call. The same float64 sums and comparisons as the arrays' (Python
    # floats are IEEE doubles), so the same cuts.
    use_lists = n <= _LIST_LAYERS and stages * (n + 1) <= _LIST_CELLS
    time_rows, end_rows = times.tolist(), ends.tolist()  # the bottleneck reads them too
    ok_start = allowed.tolist()
    mem_rows = mems.tolist() if mems is not None and use_lists else None
    cap_list = caps.tolist() if caps is not None and use_lists else None

    def solve_lists(limit: float) -> list[int] | None:
        reach = [b == 0 for b in range(n + 1)]
        parents = []
        for j in range(stages):
            t, e = time_rows[j], end_rows[j]
            m, cap = (mem_rows[j], cap_list[j]) if mem_rows is not None else (None, None)
            last = j == stages - 1
            a, ok = [0] * (n + 1), [False] * (n + 1)
            latest = -1  # the latest reachable end strictly before b
            for b in range(n + 1):
                if latest >= 0:
                    a[b] = latest
                    ok[b] = (t[b] - t[latest] + e[b] <= limit and (m is None or m[b] - m[latest] <= cap)
                             and (last or ok_start[b]))  # fmt: skip
                if reach[b]:
                    latest = b
            reach = ok
            parents.append(a)
        if not reach[n]:
            return None
        return _backtrack(parents, n, stages)

    solve = solve_lists if use_lists else solve_arrays
    found = solve(math.inf)
    if found is None:
        return None

    def bottleneck(cuts: list[int]) -> float:
        bounds = [0, *cuts, n]
        return max(time_rows[j][bounds[j + 1]] - time_rows[j][bounds[j]] + end_rows[j][bounds[j + 1]] for j in range(stages))

    lo, hi = 0.0, bottleneck(found)
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        cuts = solve(mid)
        if cuts is None:
            lo = mid
        else:
            hi, found = bottleneck(cuts), cuts
    return tuple(found)


def partition_ranks(
    time_prefix: Sequence[Sequence[float]],
    rank_of: Sequence[int],
    memory_prefix: Sequence[Sequence[float]] | None = None,
    capacity: Sequence[float] | None = None,
    cuttable: Sequence[bool] | None = None,
    *,
    end_cost: Sequence[Sequence[float]] | None = None,
    rounds: int = 48,
    patience: int = 8,
) -> tuple[int, ...] | None:
    """Cut layers into contiguous stages when a rank runs several of them (interleaved chunks).

    Stage ``j`` runs on rank ``rank_of[j]``; a rank's load is the sum of its stages' times and
    its memory the sum of their bytes, within the sum of their ``capacity``. The slowest rank
    is what counts, not the slowest stage: a fast rank may take one long chunk and one short
    one. Loads and memory are coupled across a rank's stages, so :func:`partition_layers`'
    reachability does not apply; instead prices make the objective additive (Lagrangian
    relaxation): with a weight ``w_k`` on rank ``k``'s load and a price ``u_k`` on its bytes,
    the partition minimising ``sum_k w_k load_k + u_k bytes_k`` is a shortest path over
    (stage, end layer), O(stages x layers) with prefix minima. Weights grow on the most loaded
    ranks and prices on the overflowing ones (multiplicative weights), and the best partition
    that fits is kept. A heuristic (the coupled problem is a knapsack): the search checks
    its cuts with the exact memory count and moves them further (``Explorer.descend``).

    Args:
        time_prefix: per stage, cumulative time of layers (``n + 1`` nondecreasing entries).
        rank_of: per stage, the rank running it.
        memory_prefix: per stage, cumulative bytes of layers; None: memory is not limited.
        capacity: per stage, bytes; a rank holds the sum of its stages'.
        cuttable: per layer, whether a stage may begin there (entry 0 is ignored).
        end_cost: per stage, a time added when it ends before layer ``b``.
        rounds: most price updates.
        patience: rounds without a better partition that fits before stopping.

    Returns:
        The first layer of stages ``1..``, or None if no partition found fits in memory.

    Example::

        >>> fast, slow = [0, 1, 2, 3, 4, 5, 6], [0, 3, 6, 9, 12, 15, 18]   # speeds 3:1
        >>> partition_ranks([fast, slow, fast, slow], [0, 1, 0, 1])   # loads 3 + 1 and 3 x (1 + 1)
        (3, 4, 5)
    """
    stages = len(time_prefix)
    n = len(time_prefix[0]) - 1
    if stages < 1 or n < stages:
        return None
    times = np.asarray(time_prefix, dtype=float)
    ends = np.asarray(end_cost, dtype=float) if end_cost is not None else np.zeros((stages, n + 1))
    mems = np.asarray(memory_prefix, dtype=float) if memory_prefix is not None else np.zeros((stages, n + 1))
    ranks = np.asarray(rank_of)
    num_ranks = int(ranks.max()) + 1
    caps = np.full(num_ranks, math.inf)
    if capacity is not None:
        caps = np.bincount(ranks, weights=np.asarray(capacity, dtype=float), minlength=num_ranks)
    index = np.arange(n + 1)
    allowed = np.ones(n + 1, dtype=bool)
    if cuttable is not None:
        allowed[1:n] = np.asarray(cuttable, dtype=bool)[1:n]

    def shortest(weight: np.ndarray, price: np.ndarray) -> list[int] | None:
        cost = np.where(index == 0, 0.0, math.inf)
        parents = []
        for j in range(stages):
            k = ranks[j]
            prefix = weight[k] * times[j] + price[k] * mems[j]
            start = np.where(allowed if j > 0 else index == 0, cost - prefix, math.inf)
            best = np.minimum.accumulate(start)
            arg = np.maximum.accumulate(np.where(start <= best, index, -1))
            # A stage ends at b > a: the best start strictly before b.
            best, arg = (
                np.concatenate([[math.inf], best[:-1]]),
                np.concatenate([[-1], arg[:-1]]),
            )
            cost = best + prefix + weight[k] * ends[j]
            parents.append(arg)
        if not math.isfinite(cost[n]):
            return None
        return _backtrack(parents, n, stages)

    def loads(cuts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        bounds = [0, *cuts, n]
        a, b = np.array(bounds[:-1]), np.array(bounds[1:])
        rows = np.arange(stages)
        work = times[rows, b] - times[rows, a] + ends[rows, b]
        held = mems[rows, b] - mems[rows, a]
        return np.bincount(ranks, weights=work, minlength=num_ranks), np.bincount(ranks, weights=held, minlength=num_ranks)

    # Weights start where a layer costs every rank alike (w_k in proportion to its speed), so
    # the first path already balances loads; prices are per byte, in units of a rank's time.
    total = np.bincount(ranks, weights=times[:, n], minlength=num_ranks) / np.bincount(ranks, minlength=num_ranks)
    weight = (1 / total) / (1 / total).sum()
    price = np.zeros(num_ranks)
    scale = float(total.min()) / num_ranks
    best, found, stale = math.inf, None, 0
    for step in range(rounds):
        cuts = shortest(weight, price)
        if cuts is None:
            return None
        work, held = loads(cuts)
        over = held > caps * (1 + 1e-12)
        stale += 1
        if not over.any() and work.max() < best:
            best, found, stale = float(work.max()), tuple(cuts), 0
        if stale > patience:
            break
        rate = 1.0 / math.sqrt(step + 1)
        weight = weight * np.exp(rate * (work / work.max() - 1))
        weight = weight / weight.sum()
        finite = np.isfinite(caps) & (caps > 0)
        excess = np.where(finite, (held - np.where(finite, caps, 0)) / np.where(finite, caps, 1), 0.0)
        price = np.maximum(0.0, price + rate * scale * excess / np.where(finite, caps, 1))
    return found


def _nan_first(rows: np.ndarray) -> np.ndarray:
    """``rows`` with a NaN column before the first."""
    out = np.empty((rows.shape[0], rows.shape[1] + 1))
    out[:, 0] = np.nan
    out[:, 1:] = rows
    return out


def _backtrack(parents: Sequence, n: int, stages: int, shift: int = 0) -> list[int]:
    """The cuts of a layers x stages shortest path: ``parents[j][end] - shift`` is where stage
    ``j``, ending at layer ``end``, began."""
    cuts, end = [], n
    for j in range(stages - 1, 0, -1):
        end = int(parents[j][end]) - shift
        cuts.append(end)
    return cuts[::-1]
