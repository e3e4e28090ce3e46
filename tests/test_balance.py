"""Hardware-aware balancing against brute force: rows by speed under memory, min-max rows, layer
partitions over heterogeneous stages.

Tolerances: partition bottlenecks are compared with a relative 1e-5 (the bisection stops at
1e-6 of the bottleneck); rows and cuts are integers and compared exactly where the optimum is
unique, by their objective value otherwise.
"""

from __future__ import annotations

import doctest
import itertools
import math
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whale.planner.search import balance as balance_module
from whale.planner.search.balance import (
    balance_rows,
    partition_layers,
    partition_ranks,
    rows_by_speed,
    shard_sizes_by_speed,
)


def test_doctests():
    assert doctest.testmod(balance_module).failed == 0


@given(
    st.lists(st.floats(0.1, 100.0), min_size=1, max_size=8),
    st.integers(0, 500),
    st.data(),
)
def test_rows_by_speed_follow_speed_under_capacity(speeds, extra, data):
    n = len(speeds)
    caps = data.draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    total = n + extra
    if sum(caps) < total:
        with pytest.raises(ValueError, match=r"do not fit"):
            rows_by_speed(total, speeds, caps)
        return
    rows = rows_by_speed(total, speeds, caps)
    assert sum(rows) == total and all(1 <= r <= c for r, c in zip(rows, caps))
    # Water-filling: no row could move from one replica to another that is not full and come
    # closer to proportional (rows per unit of speed), beyond the rounding of one row.
    givers = [i for i in range(n) if rows[i] > 1]
    takers = [j for j in range(n) if rows[j] < caps[j]]
    for i, j in itertools.product(givers, takers):
        assert (rows[i] - 1) / speeds[i] <= (rows[j] + 1) / speeds[j] + 1e-9


def test_rows_by_speed_moves_load_off_a_full_device():
    assert rows_by_speed(12, [3.0, 1.0]) == (9, 3)
    assert rows_by_speed(12, [3.0, 1.0], [6, 100]) == (6, 6)
    with pytest.raises(ValueError, match=r"hold 7 rows in memory but the batch has 8; 1 rows do not fit"):
        rows_by_speed(8, [1.0, 1.0], [3, 4])
    with pytest.raises(ValueError, match=r"fewer than the 2 each must take"):
        rows_by_speed(8, [1.0, 1.0], [1, 10], minimum=2)


def test_shard_sizes_follow_speed():
    assert shard_sizes_by_speed(12, [2.0, 1.0, 1.0]) == (6, 3, 3)
    assert shard_sizes_by_speed(3, [100.0, 1.0, 1.0]) == (1, 1, 1)  # every shard keeps one
    assert shard_sizes_by_speed(16, [3.0, 1.0], capacity=[10, 16]) == (10, 6)


def _compositions(total, n, low):
    if n == 1:
        if total >= low:
            yield (total,)
        return
    for r in range(low, total - low * (n - 1) + 1):
        for rest in _compositions(total - r, n - 1, low):
            yield (r, *rest)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_balance_rows_is_the_min_max_optimum(data):
    classes = data.draw(st.integers(1, 3))
    counts = data.draw(st.lists(st.integers(1, 2), min_size=classes, max_size=classes))
    m = data.draw(st.integers(1, 3))
    total = sum(counts) * m + data.draw(st.integers(0, 10))
    slope = data.draw(st.lists(st.floats(0.5, 3.0), min_size=classes, max_size=classes))
    step = data.draw(st.lists(st.floats(0.0, 2.0), min_size=classes, max_size=classes))
    cap = data.draw(st.lists(st.integers(m, total), min_size=classes, max_size=classes))
    guess = data.draw(st.none() | st.lists(st.integers(1, total), min_size=classes, max_size=classes))

    def time_of(c, r):  # monotone, with plateaus and a memory wall
        return slope[c] * r + step[c] * (r // 3) if r <= cap[c] else math.inf

    got = balance_rows(total, counts, time_of, minimum=m, guess=guess)
    owners = [c for c in range(classes) for _ in range(counts[c])]
    best = min(
        (max(time_of(owners[i], r[i]) for i in range(len(r))) for r in _compositions(total, len(owners), m)),
        default=math.inf,
    )
    if got is None:
        assert best == math.inf
        return
    flat = [r for rows in got for r in rows]
    assert sum(flat) == total and min(flat) >= m
    assert max(time_of(owners[i], flat[i]) for i in range(len(flat))) == pytest.approx(best, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_partition_is_the_min_max_optimum_on_heterogeneous_stages(data):
    n = data.draw(st.integers(1, 8))
    stages = data.draw(st.integers(1, min(n, 4)))
    layer = data.draw(st.lists(st.floats(0.1, 2.0), min_size=n, max_size=n))
    speed = data.draw(st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=stages, max_size=stages))
    bytes_ = data.draw(st.lists(st.floats(0.0, 3.0), min_size=n, max_size=n))
    held = data.draw(st.lists(st.floats(1.0, 3.0), min_size=stages, max_size=stages))
    caps = data.draw(st.lists(st.floats(1.0, 8.0), min_size=stages, max_size=stages))
    cuttable = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    ends = data.draw(st.lists(st.floats(0.0, 0.5), min_size=n + 1, max_size=n + 1))
    times = [[0.0, *itertools.accumulate(x / s for x in layer)] for s in speed]
    mems = [[0.0, *itertools.accumulate(x * h for x in bytes_)] for h in held]
    end = [ends if j < stages - 1 else [0.0] * (n + 1) for j in range(stages)]
    got = partition_layers(times, mems, caps, cuttable, end_cost=end)

    def cost(cuts):
        bounds = [0, *cuts, n]
        if any(mems[j][bounds[j + 1]] - mems[j][bounds[j]] > caps[j] for j in range(stages)):
            return math.inf
        return max(times[j][bounds[j + 1]] - times[j][bounds[j]] + end[j][bounds[j + 1]] for j in range(stages))

    allowed = [k for k in range(1, n) if cuttable[k]]
    best = min((cost(c) for c in itertools.combinations(allowed, stages - 1)), default=math.inf)
    # Small inputs run the reachability on lists; the arrays (large inputs) must cut the same,
    # to the layer: the same float sums and comparisons.
    coarse = partition_layers(times, mems, caps, cuttable, end_cost=end, rel_tol=1e-3)
    with mock.patch.multiple(balance_module, _LIST_LAYERS=0, _LIST_CELLS=0):
        assert partition_layers(times, mems, caps, cuttable, end_cost=end) == got
        assert partition_layers(times, mems, caps, cuttable, end_cost=end, rel_tol=1e-3) == coarse
    if got is None:
        assert best == math.inf
        return
    assert len(got) == stages - 1 and all(cuttable[c] for c in got) and list(got) == sorted(set(got))
    assert cost(got) == pytest.approx(best, rel=1e-5)


def test_slow_stages_get_fewer_layers_and_memory_moves_layers():
    even = list(range(10))  # 9 equal layers
    assert partition_layers([even, [2 * x for x in even]]) == (6,)  # 2:1 speed -> 6 and 3 layers
    # The fast stage may hold 3 layers only: the rest go to the slow one.
    assert partition_layers([even, [2 * x for x in even]], [even, even], [3, 10]) == (3,)
    assert partition_layers([even, even], [even, even], [4, 4]) is None  # 9 layers, room for 8


def test_partition_ranks_shares_a_rank_memory_among_its_chunks():
    # Ranks 0 and 1 each run two chunks (stages 0, 2 and 1, 3) of 6 equal layers; layer 0 holds
    # 4 of the 5 bytes rank 0 has. Split evenly per chunk (2.5 each) nothing fits; shared, the
    # first chunk takes layer 0 alone and the rank's other chunk takes the rest of its share.
    even, mem = [0, 1, 2, 3, 4, 5, 6], [0, 4, 4.5, 5, 5.5, 6, 6.5]
    assert partition_layers([even] * 4, [mem] * 4, [2.5] * 4) is None
    cuts = partition_ranks([even] * 4, [0, 1, 0, 1], [mem] * 4, [2.5] * 4)
    bounds = [0, *cuts, 6]
    held = [sum(mem[bounds[j + 1]] - mem[bounds[j]] for j in (k, k + 2)) for k in (0, 1)]
    assert cuts[0] == 1 and max(held) <= 5


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_partition_ranks_places_every_layer_within_each_rank_memory(data):
    n = data.draw(st.integers(2, 10))
    ranks = data.draw(st.integers(1, 3))
    v = data.draw(st.integers(1, max(1, min(3, n // ranks))))
    stages = ranks * v
    if stages > n:
        return
    speed = data.draw(st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=ranks, max_size=ranks))
    layer = data.draw(st.lists(st.floats(0.1, 2.0), min_size=n, max_size=n))
    bytes_ = data.draw(st.lists(st.floats(0.0, 3.0), min_size=n, max_size=n))
    caps = data.draw(st.lists(st.floats(0.5, 8.0), min_size=stages, max_size=stages))
    times = [[0.0, *itertools.accumulate(x / speed[j % ranks] for x in layer)] for j in range(stages)]
    mems = [[0.0, *itertools.accumulate(bytes_)]] * stages
    rank_of = [j % ranks for j in range(stages)]
    got = partition_ranks(times, rank_of, mems, caps)
    if got is None:
        return
    bounds = [0, *got, n]
    assert len(got) == stages - 1 and all(a < b for a, b in itertools.pairwise(bounds))
    for k in range(ranks):
        mine = [j for j in range(stages) if rank_of[j] == k]
        held = sum(mems[j][bounds[j + 1]] - mems[j][bounds[j]] for j in mine)
        assert held <= sum(caps[j] for j in mine) * (1 + 1e-9)
