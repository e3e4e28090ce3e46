"""Where each rank's shard of a bucket of parameters lies: the padded-shard layout.

A bucket's parameters, flattened and concatenated, form one logical flat of ``total``
elements; rank ``r`` owns the consecutive elements ``[r * slot, min((r + 1) * slot, total))``
with ``slot = ceil(total / size)`` (the last ranks' shards shorter, or empty), so any element
count works (no dim-0 divisibility, unlike a DTensor shard). In the bucket's buffer each rank
has a slot of ``slot`` elements: ``reduce_scatter_tensor`` of the buffer leaves rank ``r`` its
summed slot, and ``all_gather_into_tensor`` of the slots rebuilds it. Because the slots are
full up to the last shard, the buffer's first ``total`` elements are exactly the flat: packing
is one concatenation, unpacking one split.

A parameter's part of a rank's shard is a contiguous slice of its flattened elements, so with
full parameters present (ZeRO 1 and 2) a shard is a view of the parameter's own storage, and
the optimizer updates the parameter in place.

This is the layout of ``whale.runtime.comm_ops.pack_shards`` / ``unpack_shards`` (the fused
``torch.ops.whale`` ops, with ``shard_sizes`` this layout's), used where that module has them;
a pure-PyTorch path of the same two whole-bucket copies serves otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import comm_ops

__all__ = ["PaddedShardLayout"]

_pack_shards = getattr(comm_ops, "pack_shards", None)
_unpack_shards = getattr(comm_ops, "unpack_shards", None)


class PaddedShardLayout:
    """The padded-shard layout of parameters of ``numels`` elements over ``size`` ranks.

    Attributes:
        total: elements of the logical flat (every parameter).
        region: ``slot``, the elements of one rank's slot (padding included).
        numel: elements of the whole buffer, ``size * region``.
        shard_sizes: elements of each rank's shard (summing to ``total``).
        ranges: per parameter, ``(lo, hi)`` of this rank's part in the flattened parameter.

    Example::

        layout = PaddedShardLayout([10, 3], size=2, rank=1)
        layout.region, layout.ranges   # 7, [(7, 10), (0, 3)]
    """

    def __init__(self, numels: Sequence[int], size: int, rank: int) -> None:
        self.numels = tuple(int(n) for n in numels)
        self.size, self.rank = size, rank
        self.total = sum(self.numels)
        self.region = -(-self.total // size)
        self.numel = self.region * size
        self.shard_sizes = [max(0, min(self.region, self.total - r * self.region)) for r in range(size)]
        self.starts = []  # each parameter's first element in the flat
        at = 0
        for n in self.numels:
            self.starts.append(at)
            at += n
        self.ranges = tuple(self.param_range(i, rank) for i in range(len(self.numels)))

    def param_range(self, i: int, rank: int) -> tuple[int, int]:
        """``(lo, hi)`` of parameter ``i``'s elements that ``rank`` owns (``lo == hi``: none)."""
        begin, end = rank * self.region, min((rank + 1) * self.region, self.total)
        start, n = self.starts[i], self.numels[i]
        lo, hi = max(begin - start, 0), min(end - start, n)
        return (lo, hi) if hi > lo else (0, 0)

    def shard_numel(self) -> int:
        """Elements of this rank's shard (its slot less the padding)."""
        return self.shard_sizes[self.rank]

    def pack(
        self, tensors: Sequence[torch.Tensor | None], out: torch.Tensor, dtype: torch.dtype | None = None
    ) -> None:
        """Lay whole tensors (one per parameter, None for zeros) out in ``out`` (``numel``
        elements, padding zeroed): the reduce-scatter input. ``dtype``: the tensors' one dtype
        where the caller knows it (see ``comm_ops.pack``)."""
        tensors = [torch.zeros(n, dtype=dtype or out.dtype, device=out.device) if t is None else t
                   for t, n in zip(tensors, self.numels)]
        if _pack_shards is not None:
            _pack_shards(tensors, out, self.shard_sizes, dtype=dtype)
            return
        flat = [t.reshape(-1) for t in tensors]
        if all(t.dtype == out.dtype for t in flat):
            torch.cat(flat, out=out[: self.total])
        else:  # gradients travel in another dtype
            out[: self.total].copy_(torch.cat(flat))
        out[self.total :].zero_()

    def unpack(self, buffer: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the layout ``buffer`` (an all-gather output) back into whole tensors."""
        if _unpack_shards is not None:
            _unpack_shards(buffer, list(tensors), self.shard_sizes)
            return
        parts = torch.split(buffer[: self.total], list(self.numels))
        torch._foreach_copy_([t.view(-1) for t in tensors], list(parts))

    def region_views(self, region: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's part of this rank's slot ``region`` (empty where it has none): the
        views a shard's gradient (or a stage-3 shard) is."""
        begin = self.rank * self.region
        views = []
        for i, (lo, hi) in enumerate(self.ranges):
            at = self.starts[i] + lo - begin
            views.append(region[at : at + hi - lo] if hi > lo else region[:0])
        return views

