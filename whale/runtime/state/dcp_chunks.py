"""A tensor as torch.distributed.checkpoint sees it: its global shape and this rank's blocks.

DCP writes a DTensor's or ShardedTensor's local pieces as chunks with global offsets
(``ChunkStorageMetadata``), and on load reads, for each local chunk, the overlapping parts of
whatever chunks were saved, whatever plan saved them. whale's shards are neither: a fused
weight's shard is several blocks, widths are uneven and follow device speed. ``ChunkedTensor``
speaks DCP's checkpointable protocol (``__create_write_items__``, ``__create_chunk_list__``,
``__get_tensor_shard__``, as ``torch.distributed.tensor._shards_wrapper.LocalShardsWrapper``
does) for any list of blocks with offsets, so the blocks are views into the live tensors:
saving reads them, loading writes into them in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

__all__ = ["ChunkedTensor"]


class ChunkedTensor(torch.Tensor):
    """A tensor of shape ``global_shape`` of which this rank holds ``blocks``: ``(view, offsets)``
    pairs, disjoint, views of one dtype and device. Only DCP's protocol is supported; any
    other operation raises."""

    _blocks: list[tuple[torch.Tensor, tuple[int, ...]]]

    @staticmethod
    def __new__(cls, global_shape: Sequence[int], blocks: Sequence[tuple[torch.Tensor, Sequence[int]]]):
        if not blocks:
            raise ValueError("a ChunkedTensor needs at least one block")
        first = blocks[0][0]
        r = torch.Tensor._make_wrapper_subclass(cls, torch.Size(global_shape), dtype=first.dtype, device=first.device)
        r._blocks = [(t, tuple(int(o) for o in off)) for t, off in blocks]
        for t, off in r._blocks:
            if len(off) != len(global_shape) or any(o + n > g for o, n, g in zip(off, t.shape, global_shape)):
                raise ValueError(f"block of shape {tuple(t.shape)} at {off} lies outside {tuple(global_shape)}")
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"ChunkedTensor only serves torch.distributed.checkpoint; {func} is not supported")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"ChunkedTensor(shape={tuple(self.shape)}, blocks={[(tuple(t.shape), o) for t, o in self._blocks]})"

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        properties = TensorProperties.create_from_tensor(self._blocks[0][0])
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(off)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.shape),
                    properties=properties,
                    size=self.shape,
                ),
            )
            for t, off in self._blocks
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.shape) for t, off in self._blocks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.index is not None and index.index < len(self._blocks):
            t, off = self._blocks[index.index]
            if torch.Size(off) == index.offset:
                return t
        for t, off in self._blocks:
            if torch.Size(off) == index.offset:
                return t
        raise ValueError(f"{index.fqn}: this rank holds no block at {index.offset}")
