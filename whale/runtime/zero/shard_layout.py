"""Where each rank's shard of a bucket of parameters lies: the rank-major layout.

Each parameter of ``n`` elements is cut along its flattened elements into ``size`` chunks of
``c = ceil(n / size)`` (the last ones shorter or empty, so any ``n`` works: no shape or
divisibility is required, unlike a dim-0 shard). A bucket lays the chunks out rank-major: rank
``r``'s chunks of every parameter, then rank ``r + 1``'s, each padded to ``c``. Rank ``r``'s
region, ``[r * C, (r + 1) * C)`` with ``C`` the sum of the ``c``, is then contiguous, which is
what ``reduce_scatter_tensor`` leaves on a rank and what ``all_gather_into_tensor`` takes from
it, so one collective serves the whole bucket. A shard is a contiguous slice of its flattened
parameter, so with full parameters present (ZeRO 1 and 2) it is a view of the parameter's own
storage and the optimizer updates the parameter in place.

``pack`` and ``unpack`` move tensors between the parameters' shapes and the layout. They are
the reduce-scatter and all-gather layout copies that ``whale.runtime.comm_ops`` is to offer
as fused ops; until then these strided copies (two per parameter, none per element) serve.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RankMajorLayout"]


class RankMajorLayout:
    """The rank-major layout of parameters of ``numels`` elements over ``size`` ranks.

    Attributes:
        chunks: per parameter, the padded chunk ``c`` each rank holds.
        offsets: per parameter, where its chunk starts inside a rank's region.
        region: ``C``, the elements of one rank's region (padding included).
        ranges: per parameter, ``(lo, hi)`` of this rank's chunk in the flattened parameter.

    Example::

        layout = RankMajorLayout([10, 3], size=2, rank=1)
        layout.region, layout.ranges   # 7, [(5, 10), (2, 3)]
    """

    def __init__(self, numels: Sequence[int], size: int, rank: int) -> None:
        self.numels = tuple(int(n) for n in numels)
        self.size, self.rank = size, rank
        self.chunks = tuple(-(-n // size) for n in self.numels)
        offsets, at = [], 0
        for c in self.chunks:
            offsets.append(at)
            at += c
        self.offsets = tuple(offsets)
        self.region = at
        self.ranges = tuple(
            (min(rank * c, n), min((rank + 1) * c, n)) for n, c in zip(self.numels, self.chunks)
        )

    @property
    def numel(self) -> int:
        """Elements of the whole bucket: every rank's region."""
        return self.region * self.size

    def shard_numel(self) -> int:
        """Elements of this rank's shards (the region less its padding)."""
        return sum(hi - lo for lo, hi in self.ranges)

    def pack(self, tensors: Sequence[torch.Tensor | None], out: torch.Tensor) -> None:
        """Copy whole tensors (one per parameter, None for zeros) into the layout ``out``
        (``numel`` elements, zero where a tensor is None or past its end)."""
        grid = out.view(self.size, self.region)
        for t, n, c, at in zip(tensors, self.numels, self.chunks, self.offsets):
            block = grid[:, at : at + c]
            if t is None:
                block.zero_()
                continue
            flat = t.reshape(-1)
            rows, tail = divmod(n, c) if c else (0, 0)
            if rows:
                block[:rows].copy_(flat[: rows * c].view(rows, c))
            if tail:
                block[rows, :tail].copy_(flat[rows * c :])
            if rows < self.size:
                # The padding: a chunk past the parameter's end holds zeros (summed harmlessly).
                block[rows, tail:].zero_()
                block[rows + 1 :].zero_()

    def unpack(self, buffer: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the layout ``buffer`` back into whole tensors (one per parameter, contiguous)."""
        grid = buffer.view(self.size, self.region)
        for t, n, c, at in zip(tensors, self.numels, self.chunks, self.offsets):
            flat = t.view(-1)
            block = grid[:, at : at + c]
            rows, tail = divmod(n, c) if c else (0, 0)
            if rows:
                flat[: rows * c].view(rows, c).copy_(block[:rows])
            if tail:
                flat[rows * c :].copy_(block[rows, :tail])

    def region_views(self, region: torch.Tensor) -> list[torch.Tensor]:
        """This rank's chunk of each parameter inside ``region`` (its ``C`` elements), padding
        left out: the views a shard's gradient (or a stage-3 shard) is."""
        return [region[at : at + hi - lo] for at, (lo, hi) in zip(self.offsets, self.ranges)]
