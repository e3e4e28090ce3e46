"""Fused bucket kernels: pack many tensors into one flat buffer and back, whole or sharded.

The data-parallel reducer packs each bucket's gradients, scaled by the replica's weight
(``rows_r / global_rows``) and cast to the communication dtype, into one flat buffer,
all-reduces it, and unpacks it (:func:`pack`, :func:`unpack`). Sharded data parallelism
(ZeRO) reduce-scatters and all-gathers instead: :func:`pack_shards` lays the tensors out as a
reduce-scatter input cut into per-rank shards (uneven allowed, each padded to one slot size),
:func:`unpack_shards` reads an all-gather output of that layout back into the tensors.

Two backends do the same arithmetic, bit for bit:

- ``"extension"``: ``torch.ops.whale.pack`` / ``unpack`` / ``pack_shards`` / ``unpack_shards``
  from ``csrc/`` — one parallel pass on CPU, one fused launch per bucket on CUDA (where a
  non-contiguous tensor costs one extra copy), and Meta kernels so the ops trace under
  ``FakeTensorMode`` and ``torch.compile``. Eager CPU calls on plain tensors skip the
  dispatcher's per-tensor argument conversion (about 120 ns a tensor) through the library's
  direct entry, which runs the same kernel with the same checks. Built by :func:`build_extension`
  (``whale build-ext``), loaded from torch's extension cache afterwards.
- ``"pure"``: a few whole-bucket torch ops (pack: ``torch.cat`` into ``out`` then one in-place
  ``mul_``, or into a temporary then ``mul(out=)`` where the cast narrows; unpack: one ``mul``,
  one split, one ``torch._foreach_copy_``), used where the extension is not built (or
  ``WHALE_DISABLE_EXT=1``). Per-tensor Python is limited to one pass over the dtypes (and,
  to unpack, the devices and sizes), and none to pack where the caller gives the tensors' one
  dtype (``dtype=``, as whale's gradient reducers do); ``benchmarks/bench_comm_ops.py``
  measures it against the fastest plain sequence.

Arithmetic: every element is ``round_to_dst(opmath(x) * opmath(scale))``, where opmath is
float64 if either side is float64 and float32 otherwise (as torch's own half/bfloat16
kernels), so each value is rounded once.

Example::

    flat = torch.empty(sum(g.numel() for g in grads), dtype=torch.bfloat16)
    pack(grads, flat, scale=rows / global_rows)
    dist.all_reduce(flat)
    unpack(flat, grads)

    # ZeRO: 3 ranks, uneven shards, one slot of max(sizes) elements each
    sizes = shard_sizes(sum(g.numel() for g in grads), 3)
    buffer = torch.empty(padded_numel(sizes), dtype=torch.bfloat16)
    pack_shards(grads, buffer, sizes, scale=1 / 3)
    dist.reduce_scatter_tensor(slot := buffer.new_empty(max(sizes)), buffer)
    my_shard = slot[: sizes[rank]]
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ... import csrc_build
from .pure_path import (
    _check_dtype,
    _check_scale,
    _check_shard_sizes,
    _check_slots,
    _pack_pure,
    _pack_shards_pure,
    _unpack_pure,
    _unpack_shards_pure,
)

__all__ = [
    "backend",
    "build_extension",
    "extension_available",
    "pack",
    "pack_shards",
    "padded_numel",
    "shard_range",
    "shard_sizes",
    "unpack",
    "unpack_shards",
]

_DISABLE_ENV = "WHALE_DISABLE_EXT"


def pack(
    tensors: Sequence[torch.Tensor], out: torch.Tensor, scale: float = 1.0, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Write ``scale * t``, flattened, for each tensor consecutively into ``out``.

    Args:
        tensors: floating tensors on ``out``'s device, any shapes and strides, any floating dtypes.
        out: 1-D contiguous floating tensor with ``sum(t.numel())`` elements; may have another
            dtype than the tensors (the values are cast, rounded once).
        scale: factor applied to every element.
        dtype: the one dtype of all the tensors, where the caller knows it (the gradients of a
            bucket of one parameter dtype). The pure path then skips its pass over the tensors'
            dtypes (about 0.1 us a tensor, a quarter of the op on 5,000 small tensors); a tensor
            of another dtype is then cast as ``torch.cat`` casts it, where it would otherwise be
            refused (not floating) or rounded once. The extension checks every dtype as always.

    Returns:
        ``out``.

    Raises:
        ValueError: shapes, sizes or devices do not fit (the message says which tensor).
            ``out`` is then left as it is, except where the tensors hold fewer elements than
            it: the pure path's one ``torch.cat`` has written their values into its head
            before the count is checked (a second pass over the tensors to count first would
            cost as much as the check on the hot path).
        TypeError: a dtype is not floating (or ``dtype`` is not a bucket dtype), or ``scale``
            is not a real number.

    Example::

        out = pack([torch.ones(2, 2), torch.ones(3)], torch.empty(7, dtype=torch.bfloat16), 0.5)
    """
    tensors = list(tensors)
    scale = _check_scale("whale.pack", scale)
    _check_dtype("whale.pack", dtype)
    if _use_extension(out.device):
        if not _direct(0, out, tensors, [], scale):
            torch.ops.whale.pack(tensors, out, scale)
    else:
        _pack_pure(tensors, out, scale, dtype)
    return out


def unpack(
    flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0
) -> list[torch.Tensor]:
    """Write ``scale * flat[offset:offset + t.numel()]`` into each tensor, in place, in order.

    Args:
        flat: 1-D contiguous floating tensor with ``sum(t.numel())`` elements.
        tensors: floating tensors on ``flat``'s device to overwrite (cast to each one's dtype);
            strided tensors are fine, overlapping ones (``expand()``) are not.
        scale: factor applied to every element.

    Returns:
        ``tensors``, as a list.

    Raises:
        ValueError: shapes, sizes, devices or memory overlap do not fit.
        TypeError: a dtype is not floating, or ``scale`` is not a real number.

    Example::

        grads = unpack(flat, grads)
    """
    tensors = list(tensors)
    scale = _check_scale("whale.unpack", scale)
    if _use_extension(flat.device):
        if not _direct(1, flat, tensors, [], scale):
            torch.ops.whale.unpack(flat, tensors, scale)
    else:
        _unpack_pure(flat, tensors, scale)
    return tensors


def shard_sizes(
    total: int, world_size: int, weights: Sequence[float] | None = None
) -> list[int]:
    """Cut ``total`` elements into ``world_size`` consecutive shards.

    Args:
        total: elements of the logical flat (``sum(t.numel())``).
        world_size: number of shards (ranks).
        weights: relative shard sizes (e.g. replica speeds); None splits evenly, the first
            ``total % world_size`` shards getting one element more.

    Returns:
        ``world_size`` non-negative sizes summing to ``total`` (largest remainders round up).

    Raises:
        ValueError: ``total`` is negative, ``world_size`` is not positive, or ``weights`` has
            another length, a negative or non-finite entry, or sums to zero.

    Example::

        shard_sizes(10, 4)              # [3, 3, 2, 2]
        shard_sizes(10, 2, [3.0, 1.0])  # [8, 2]
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"whale.shard_sizes: total must be an int >= 0, got {total!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"whale.shard_sizes: world_size must be an int >= 1, got {world_size!r}")
    if weights is None:
        base, extra = divmod(total, world_size)
        return [base + (r < extra) for r in range(world_size)]
    weights = [float(w) for w in weights]
    if len(weights) != world_size:
        raise ValueError(
            f"whale.shard_sizes: {len(weights)} weights for world_size {world_size}; give one "
            "weight per rank"
        )
    if any(not w >= 0 or w == float("inf") for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"whale.shard_sizes: weights must be finite, >= 0 and not all zero, got {weights}"
        )
    exact = [total * w / sum(weights) for w in weights]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(world_size), key=lambda r: (sizes[r] - exact[r], r))
    for r in by_remainder[: total - sum(sizes)]:
        sizes[r] += 1
    return sizes


def padded_numel(shard_sizes: Sequence[int]) -> int:
    """The smallest buffer of the padded-shard layout: one slot of ``max(shard_sizes)`` per rank.

    Example::

        padded_numel([3, 3, 2, 2])   # 12
    """
    sizes = _check_shard_sizes("whale.padded_numel", shard_sizes)
    return len(sizes) * max(sizes)


def shard_range(shard_sizes: Sequence[int], rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s shard in the logical flat (unpadded) order.

    Example::

        shard_range([3, 3, 2, 2], 2)   # (6, 8)
    """
    sizes = _check_shard_sizes("whale.shard_range", shard_sizes)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(sizes):
        raise ValueError(f"whale.shard_range: rank {rank!r} is not in [0, {len(sizes)})")
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def pack_shards(
    tensors: Sequence[torch.Tensor],
    out: torch.Tensor,
    shard_sizes: Sequence[int],
    scale: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Lay ``scale * tensors`` out as a reduce-scatter input of uneven, padded shards.

    The tensors, flattened and concatenated, are cut into consecutive shards of
    ``shard_sizes[r]`` elements; shard ``r`` is written to
    ``out[r * slot : r * slot + shard_sizes[r]]`` where ``slot = out.numel() // len(shard_sizes)``,
    and the rest of each slot is zeroed. ``dist.reduce_scatter_tensor`` of ``out`` then leaves
    rank ``r`` its summed shard in the first ``shard_sizes[r]`` elements of its slot.

    Args:
        tensors: as for :func:`pack`.
        out: 1-D contiguous floating tensor; ``out.numel()`` a multiple of ``len(shard_sizes)``
            whose quotient is at least ``max(shard_sizes)`` (:func:`padded_numel` is the least).
        shard_sizes: elements per rank, ``>= 0``, summing to ``sum(t.numel())``.
        scale: factor applied to every element (rounded once, as :func:`pack`).
        dtype: the tensors' one dtype where the caller knows it, as for :func:`pack`.

    Returns:
        ``out``.

    Raises:
        ValueError: sizes, slots, devices do not fit (the message says which and how to fix).
        TypeError: a dtype is not floating, or ``scale`` is not a real number.

    Example::

        sizes = shard_sizes(7, 2)                               # [4, 3]
        out = pack_shards([torch.ones(2, 2), torch.ones(3)], torch.empty(8), sizes, 0.5)
        # out: [.5, .5, .5, .5, .5, .5, .5, 0.]
    """
    tensors = list(tensors)
    scale = _check_scale("whale.pack_shards", scale)
    sizes = _check_shard_sizes("whale.pack_shards", shard_sizes)
    _check_dtype("whale.pack_shards", dtype)
    if _use_extension(out.device):
        if not _direct(2, out, tensors, sizes, scale):
            torch.ops.whale.pack_shards(tensors, out, sizes, scale)
    else:
        _check_slots("whale.pack_shards", out, "out", sizes)
        _pack_shards_pure(tensors, out, sizes, scale, dtype)
    return out


def unpack_shards(
    flat: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    shard_sizes: Sequence[int],
    scale: float = 1.0,
) -> list[torch.Tensor]:
    """Read an all-gather output of the padded-shard layout back into ``tensors``, in place.

    The inverse of :func:`pack_shards`: the first ``shard_sizes[r]`` elements of each slot of
    ``flat``, concatenated, are scaled and written into the tensors in order; padding is skipped.

    Args:
        flat: 1-D contiguous floating tensor laid out as :func:`pack_shards` writes.
        tensors: as for :func:`unpack`.
        shard_sizes: elements per rank, summing to ``sum(t.numel())``.
        scale: factor applied to every element.

    Returns:
        ``tensors``, as a list.

    Raises:
        ValueError: sizes, slots, devices or memory overlap do not fit.
        TypeError: a dtype is not floating, or ``scale`` is not a real number.

    Example::

        dist.all_gather_into_tensor(flat, flat[rank * slot : (rank + 1) * slot])
        params = unpack_shards(flat, params, sizes)
    """
    tensors = list(tensors)
    scale = _check_scale("whale.unpack_shards", scale)
    sizes = _check_shard_sizes("whale.unpack_shards", shard_sizes)
    if _use_extension(flat.device):
        if not _direct(3, flat, tensors, sizes, scale):
            torch.ops.whale.unpack_shards(flat, tensors, sizes, scale)
    else:
        _check_slots("whale.unpack_shards", flat, "flat", sizes)
        _unpack_shards_pure(flat, tensors, sizes, scale)
    return tensors


def extension_available() -> bool:
    """Whether ``torch.ops.whale`` is loaded, loading a cached build on first call.

    Never compiles; :func:`build_extension` does. Ignores ``WHALE_DISABLE_EXT``.
    """
    return bool(_extension_kernels())


def backend(device: torch.device | str = "cpu") -> str:
    """Which path :func:`pack`/:func:`unpack` take for tensors on ``device``.

    Returns:
        ``"extension"`` or ``"pure"``.

    Example::

        print(backend("cuda"))   # "extension" after `whale build-ext` on a GPU machine
    """
    return "extension" if _use_extension(torch.device(device), warn=False) else "pure"


def build_extension(verbose: bool = False) -> Path:
    """Compile the extension into torch's extension cache and load it (``whale build-ext``).

    A no-op build when it is up to date. Includes the CUDA kernels when a GPU, a CUDA torch and
    ``CUDA_HOME`` are present. See :mod:`whale.csrc_build`.

    Args:
        verbose: print the compiler commands and output.

    Returns:
        The path of the built library.

    Raises:
        RuntimeError: the toolchain is missing or compilation failed.
    """
    path = csrc_build.build(verbose=verbose)
    _extension_kernels.cache_clear()
    return path


@functools.cache
def _extension_kernels() -> frozenset[str]:
    """Device types the loaded extension has kernels for (empty when it is not built)."""
    if not csrc_build.ops_registered() and csrc_build.load_prebuilt() is None:
        return frozenset()
    return frozenset(
        key.lower()
        for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key("whale::pack", key)
    )


def _direct(op: int, flat: torch.Tensor, tensors: list[torch.Tensor], sizes: list[int], scale: float) -> bool:
    """Run a CPU op through the extension's direct entry (csrc/whale_ops_py.cpp: no per-tensor
    dispatcher conversion); False, nothing written, where the call must go through
    ``torch.ops.whale`` (another device, a subclass or mode, a bad argument, or tracing, so
    ``torch.compile`` still records the op)."""
    entry = csrc_build.python_entry()
    if entry is None or not flat.is_cpu or torch.compiler.is_compiling():
        return False
    return entry(op, flat, tensors, sizes, scale)


def _use_extension(device: torch.device, warn: bool = True) -> bool:
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return False
    kernels = _extension_kernels()
    if device.type in kernels:
        return True
    if kernels and warn and device.type == "cuda":
        warnings.warn(
            "whale: the extension was built without CUDA kernels, so CUDA buckets use the pure "
            "PyTorch path; run `whale build-ext` with a GPU and CUDA_HOME present to fuse them",
            stacklevel=3,
        )
    return False
