"""How a sharded tensor is laid out, and how views, broadcasts and indexing move its sharded dim.

A sharded value has one sharded dimension ``dim`` made of ``blocks`` equal blocks of
``per_block`` elements. Its region (the set of modules sharded together) has ``A`` atoms; every
block is ``A`` atoms of ``per_block / A`` elements, and rank ``r`` holds ``sizes[r]`` consecutive
atoms of every block. A fused ``qkv`` output of width ``3 * n_embd`` is ``blocks=3``,
``per_block=n_embd``; after ``view(B, T, n_head, head_dim)`` of one of q, k, v the sharded dim is
the head dim with ``blocks=1``, ``per_block=n_head``, and ``A`` must divide ``n_head``.

Everything here is pure shape arithmetic on the full (unsharded) shapes capture recorded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["ShardLayout", "ViewMove", "broadcast_dim", "index_move", "local_width", "view_groups", "view_move"]


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """A value sharded along ``dim`` (non-negative) over the ranks of one region."""

    dim: int
    blocks: int
    per_block: int  # full elements of one block along ``dim``
    region: int  # region id (union-find root after analysis)
    anchor: str  # the node that created the sharding (a column-parallel Linear)

    def moved(self, dim: int, blocks: int | None = None, per_block: int | None = None) -> ShardLayout:
        return dataclasses.replace(
            self,
            dim=dim,
            blocks=self.blocks if blocks is None else blocks,
            per_block=self.per_block if per_block is None else per_block,
        )

    def same_structure(self, other: ShardLayout) -> bool:
        return (self.dim, self.blocks, self.per_block) == (other.dim, other.blocks, other.per_block)


def local_width(layout: ShardLayout, num_atoms: int, atoms_here: int) -> int:
    """Elements of the sharded dim a rank holding ``atoms_here`` of ``num_atoms`` atoms keeps."""
    assert layout.per_block % num_atoms == 0, (layout, num_atoms)
    return layout.blocks * atoms_here * (layout.per_block // num_atoms)


def view_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """Pair up runs of ``src`` and ``dst`` dims with equal products (how ``view`` regroups them).

    Returns None when the shapes hold different element counts or a zero-sized dim.

    Example::

        >>> view_groups((2, 16, 32), (2, 16, 4, 8))
        [((0,), (0,)), ((1,), (1,)), ((2,), (2, 3))]
    """
    if math.prod(src) != math.prod(dst) or 0 in src or 0 in dst:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) and j < len(dst):
        gi, gj = [i], [j]
        pa, pb = src[i], dst[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gi.append(i)
                pa *= src[i]
                i += 1
            else:
                gj.append(j)
                pb *= dst[j]
                j += 1
        groups.append((gi, gj))
    # Trailing size-1 dims join the last group.
    if groups:
        groups[-1][0].extend(range(i, len(src)))
        groups[-1][1].extend(range(j, len(dst)))
    else:
        groups.append((list(range(len(src))), list(range(len(dst)))))
    return [(tuple(a), tuple(b)) for a, b in groups]


@dataclasses.dataclass(frozen=True)
class ViewMove:
    """Where a view puts the sharded dim: the new (dim, blocks, per_block); ``A`` must divide ``per_block``."""

    dim: int
    blocks: int
    per_block: int
    splits_dim: bool  # the view split the sharded dim into several (e.g. into heads x head_dim)


def view_move(layout: ShardLayout, src: Sequence[int], dst: Sequence[int]) -> ViewMove | None:
    """The sharded dim of ``x.view(dst)`` for ``x`` of full shape ``src`` sharded as ``layout``.

    The sharded elements of the group holding ``layout.dim`` are ``outer`` runs of
    ``per_block * inner`` contiguous elements; the output dim that starts where the ``outer``
    runs start (or that the runs cut into equal blocks) becomes the sharded dim. None: the view
    mixes sharded and unsharded elements in one dim and cannot be sharded.
    """
    groups = view_groups(src, dst)
    if groups is None:
        return None
    d = layout.dim
    gi, gj = next((a, b) for a, b in groups if d in a)
    k = gi.index(d)
    outer = layout.blocks * math.prod(src[x] for x in gi[:k])
    splits = len(gj) > 1 and len(gi) == 1
    prefix = 1
    for p, size in enumerate(dst[x] for x in gj):
        if prefix == outer and size > 1:
            return ViewMove(gj[p], 1, size, splits)
        if prefix < outer < prefix * size and outer % prefix == 0 and size % (outer // prefix) == 0:
            blocks = outer // prefix
            return ViewMove(gj[p], blocks, size // blocks, splits)
        prefix *= size
    return None


def broadcast_dim(operand_ndim: int, out_ndim: int, dim: int) -> int:
    """Dim ``dim`` of an operand in the output of a broadcasting op (shapes align on the right)."""
    return dim + (out_ndim - operand_ndim)


def index_move(index: object, ndim: int, dim: int, sizes: Sequence[int]) -> tuple[str, int | None]:
    """What ``x[index]`` does to dim ``dim`` of an ``ndim``-dim ``x`` of full shape ``sizes``.

    Returns ``("keep", out_dim)`` (a full slice), ``("int", None)`` (an integer picks one
    entry), ``("partial", None)`` (a bounded slice or a tensor index).
    """
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded: list[object] = []
    for it in items:
        if it is Ellipsis:
            expanded.extend([slice(None)] * (ndim - consumed))
        else:
            expanded.append(it)
    expanded.extend([slice(None)] * (ndim - sum(1 for it in expanded if it is not None)))
    in_dim = out_dim = 0
    for it in expanded:
        if it is None:
            out_dim += 1
            continue
        if in_dim == dim:
            if isinstance(it, slice):
                full = (it.start in (None, 0) and it.step in (None, 1)
                        and (it.stop is None or (isinstance(it.stop, int) and it.stop >= sizes[dim])))
                return ("keep", out_dim) if full else ("partial", None)
            if isinstance(it, int) and not isinstance(it, bool):
                return "int", None
            return "partial", None
        if isinstance(it, slice):
            out_dim += 1
        elif not (isinstance(it, int) and not isinstance(it, bool)):
            return "partial", None  # a tensor index reorders dims: not tracked
        in_dim += 1
    return "partial", None
