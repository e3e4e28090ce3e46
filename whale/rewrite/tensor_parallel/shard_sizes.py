"""Shard-size arithmetic: how many heads, columns, classes or experts each rank holds.

A sharded region has ``num_atoms`` indivisible units (a head, a column, an expert); rank ``r``
holds ``sizes[r]`` consecutive atoms starting at ``row_offsets(sizes)[r]``
(:func:`whale.ir.rows.row_offsets`). Sizes may differ per rank (the planner gives faster
devices more) but add up to ``num_atoms`` and are at least 1 each.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["even_sizes", "validate_sizes"]


def even_sizes(num_atoms: int, parts: int) -> tuple[int, ...]:
    """``num_atoms`` split as evenly as possible, the remainder to the first ranks.

    Example::

        >>> even_sizes(10, 4)
        (3, 3, 2, 2)
    """
    q, r = divmod(num_atoms, parts)
    return tuple(q + (i < r) for i in range(parts))


def validate_sizes(
    where: str, kind: str, num_atoms: int, sizes: Sequence[int] | None, parts: int
) -> tuple[int, ...]:
    """Check user- or planner-given sizes for one region (None: even), return them as a tuple.

    Args:
        where: the region's module path, for messages.
        kind: what an atom is, plural ("heads", "columns", "classes", "experts", ...).
        num_atoms: how many atoms the region has.
        sizes: per-rank atom counts, or None for an even split.
        parts: ranks in the tensor-parallel group.

    Raises:
        ValueError: more ranks than atoms, sizes that do not add up, a rank with none.
        TypeError: sizes that are not a list of ints.
    """
    if parts > num_atoms:
        raise ValueError(
            f"split({parts}) at {where!r}: {parts} shards but only {num_atoms} {kind}; every "
            f"rank needs at least one. Use split({num_atoms}) or fewer devices for this part"
        )
    if sizes is None:
        return even_sizes(num_atoms, parts)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in sizes
    ):
        raise TypeError(f"shard_sizes[{where!r}] must be a list of ints (one per rank), got {sizes!r}")
    sizes = tuple(sizes)
    if len(sizes) != parts:
        raise ValueError(
            f"shard_sizes[{where!r}] = {list(sizes)} has {len(sizes)} entries for a tensor-parallel "
            f"group of {parts} ranks; give one size per rank"
        )
    if any(s < 1 for s in sizes):
        raise ValueError(
            f"shard_sizes[{where!r}] = {list(sizes)}: every rank needs at least 1 of the "
            f"{num_atoms} {kind}"
        )
    if sum(sizes) != num_atoms:
        raise ValueError(
            f"shard_sizes[{where!r}] = {list(sizes)} adds up to {sum(sizes)} but {where!r} has "
            f"{num_atoms} {kind}; give sizes that add up to {num_atoms}"
        )
    return sizes
