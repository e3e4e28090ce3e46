"""How a batch of rows is cut among replicas (and micro-batches) of different speeds."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["split_rows", "row_offsets"]


def split_rows(total: int, weights: Sequence[float], *, what: str = "replicas") -> tuple[int, ...]:
    """Cut ``total`` rows into ``len(weights)`` parts proportional to ``weights``.

    Largest-remainder apportionment (Hamilton's method): every part gets the floor of its exact
    share, and the rows left over go to the largest fractional remainders, ties to the lower
    index. Every part gets at least one row, so a replica never idles through a step.

    Example::

        >>> split_rows(10, [1, 1, 2])
        (3, 2, 5)

    Raises:
        ValueError: if ``total`` is smaller than the number of parts, or a weight is not > 0.
    """
    n = len(weights)
    if n == 0:
        raise ValueError(f"cannot split {total} rows over zero {what}")
    if any(not w > 0 for w in weights):
        raise ValueError(f"row weights must be > 0, got {list(weights)}")
    if total < n:
        raise ValueError(
            f"a batch of {total} rows cannot be split over {n} {what}: each needs at least one "
            f"row; use a global batch of at least {n} rows"
        )
    wsum = float(sum(weights))
    exact = [total * w / wsum for w in weights]
    rows = [int(e) for e in exact]
    for i in sorted(range(n), key=lambda i: (-(exact[i] - rows[i]), i))[: total - sum(rows)]:
        rows[i] += 1
    # A very slow replica may round to zero rows: lend it one from the largest part.
    for i in range(n):
        if rows[i] == 0:
            donor = max((j for j in range(n) if rows[j] > 1), key=lambda j: rows[j] - exact[j])
            rows[donor] -= 1
            rows[i] = 1
    return tuple(rows)


def row_offsets(rows: Sequence[int]) -> tuple[int, ...]:
    """Start offset of each part (rows of a batch, atoms of a shard): ``(0, rows[0], rows[0] + rows[1], ...)``."""
    offsets, at = [], 0
    for r in rows:
        offsets.append(at)
        at += r
    return tuple(offsets)
