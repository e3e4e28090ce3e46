"""Row-splitting arithmetic: how a batch is cut among replicas of different speeds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whale.ir.rows import row_offsets, split_rows


@given(
    st.lists(st.floats(0.01, 100.0, allow_nan=False), min_size=1, max_size=16),
    st.integers(0, 10_000),
)
def test_split_rows_properties(weights, extra):
    total = len(weights) + extra
    rows = split_rows(total, weights)
    assert sum(rows) == total
    assert all(r >= 1 for r in rows)
    exact = [total * w / sum(weights) for w in weights]
    # Within one row of the exact share, unless a part was lent a row to reach the minimum of 1.
    if all(e >= 1 for e in exact):
        assert all(abs(r - e) < 1 for r, e in zip(rows, exact))
    # A faster replica never gets fewer rows than a slower one.
    for i in range(len(weights)):
        for j in range(len(weights)):
            if weights[i] > weights[j]:
                assert rows[i] >= rows[j]


@given(st.integers(1, 64), st.integers(1, 1000))
def test_even_weights_differ_by_at_most_one(n, extra):
    rows = split_rows(n + extra, [1.0] * n)
    assert max(rows) - min(rows) <= 1


def test_known_splits():
    assert split_rows(10, [1, 1, 2]) == (3, 2, 5)
    assert split_rows(8, [3, 1]) == (6, 2)
    assert split_rows(5, [100, 1, 1]) == (3, 1, 1)
    assert row_offsets((3, 2, 5)) == (0, 3, 5)


def test_too_few_rows_is_a_named_error():
    with pytest.raises(ValueError, match="a batch of 3 rows cannot be split over 4 replicas"):
        split_rows(3, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="must be > 0"):
        split_rows(3, [1, 0])
