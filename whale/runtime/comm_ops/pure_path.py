"""The pure-PyTorch path of :mod:`whale.runtime.comm_ops`, and the argument checks both share.

Whole-bucket ops only: pack, one ``torch.cat`` of 1-D tensors straight into ``out`` (through
an alias whose storage cannot grow) then one in-place ``mul_``; otherwise one ``torch.cat`` (or
``flatten_dense_tensors``, its C++ loop of views, for N-D tensors) into a temporary, one ``mul``
with ``out=``; back, one split and one ``torch._foreach_copy_``. Per-tensor Python is one pass
over the dtypes and devices (and, to unpack, the sizes); pack skips the dtype pass where the
caller states the dtype. Anything off that fast path (mixed dtypes, strided targets, bad input) goes
through the full check, whose messages are the extension's (csrc/whale_ops.cpp), and then the
per-tensor general path. Arithmetic as the extension's: each element is
``round_to_dst(opmath(x) * opmath(scale))``, rounded once.
"""

from __future__ import annotations

import numbers
import operator

import torch

_BUCKET_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BUCKET_DTYPE_NAMES = "torch.float16, torch.bfloat16, torch.float32 or torch.float64"
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_scale(op: str, scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number, got {type(scale).__name__}")
    return float(scale)


def _check_dtype(op: str, dtype: object) -> None:
    """A caller's ``dtype`` for the tensors: None or a bucket dtype."""
    if dtype is not None and dtype not in _BUCKET_DTYPES:
        raise TypeError(f"{op}: dtype must be None or one of {_BUCKET_DTYPE_NAMES}, got {dtype!r}")


def _check_shard_sizes(op: str, shard_sizes: object) -> list[int]:
    try:
        sizes = [int(n) for n in shard_sizes]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(
            f"{op}: shard_sizes must be a sequence of ints (elements per rank), got "
            f"{shard_sizes!r}"
        ) from None
    if not sizes:
        raise ValueError(f"{op}: shard_sizes is empty; give one size per rank")
    if any(isinstance(n, bool) or n != int(n) for n in shard_sizes):  # type: ignore[union-attr]
        raise TypeError(f"{op}: shard_sizes must be ints, got {list(shard_sizes)}")  # type: ignore[call-overload]
    negative = [r for r, n in enumerate(sizes) if n < 0]
    if negative:
        raise ValueError(
            f"{op}: shard_sizes[{negative[0]}] is {sizes[negative[0]]}; shard sizes are >= 0"
        )
    return sizes


def _check_slots(op: str, flat: torch.Tensor, flat_name: str, sizes: list[int]) -> None:
    """The extension's ``check_slots`` (csrc/whale_ops.cpp), with the same messages."""
    _check_flat(op, flat, flat_name)
    world, largest = len(sizes), max(sizes)
    if flat.numel() % world or flat.numel() // world < largest:
        raise ValueError(
            f"{op}: {flat_name} has {flat.numel()} elements, which is not {world} slots of at "
            f"least {largest} (the largest shard); size {flat_name} to "
            f"len(shard_sizes) * max(shard_sizes) = {world * largest} (padded_numel)"
        )


def _check_flat(op: str, flat: torch.Tensor, flat_name: str) -> None:
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(
            f"{op}: {flat_name} must be a 1-D contiguous tensor, got shape {list(flat.shape)} "
            f"(contiguous={flat.is_contiguous()}); allocate it with "
            "torch.empty(total_numel, dtype=..., device=...)"
        )
    if flat.dtype not in _BUCKET_DTYPES:
        raise TypeError(
            f"{op}: {flat_name} has dtype {flat.dtype}; buckets hold {_BUCKET_DTYPE_NAMES}"
        )


def _check_bucket(
    op: str,
    flat: torch.Tensor,
    flat_name: str,
    tensors: list[torch.Tensor],
    written: bool,
    shards: list[int] | None = None,
) -> None:
    """The extension's ``check_bucket`` (csrc/whale_ops.cpp), with the same messages.

    ``shards``: the tensors fill these shard sizes (sharded ops) rather than all of ``flat``.
    """
    _check_flat(op, flat, flat_name)
    total = 0
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: tensors[{i}] is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in _BUCKET_DTYPES:
            raise TypeError(
                f"{op}: tensors[{i}] has dtype {t.dtype}; buckets hold {_BUCKET_DTYPE_NAMES}"
            )
        if t.device != flat.device:
            raise ValueError(
                f"{op}: tensors[{i}] is on {t.device} but {flat_name} is on {flat.device}; "
                "a bucket lives on one device"
            )
        if written and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(
                f"{op}: tensors[{i}] has overlapping memory (e.g. an expand()ed view) and cannot "
                "be written in place"
            )
        total += t.numel()
    if shards is not None and total != sum(shards):
        raise ValueError(
            f"{op}: the tensors hold {total} elements in total but shard_sizes sum to "
            f"{sum(shards)}; the shard sizes must add up to sum(t.numel() for t in tensors)"
        )
    if shards is None and total != flat.numel():
        raise ValueError(
            f"{op}: the tensors hold {total} elements in total but {flat_name} has "
            f"{flat.numel()}; size {flat_name} to sum(t.numel() for t in tensors)"
        )


def _opmath(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _holds_exactly(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every ``src`` value is a ``dst`` value (the cast is exact)."""
    return src == dst or dst == torch.float64 or (dst == torch.float32 and src in _HALF_DTYPES)


# Integer views of the bucket dtypes, for numpy (which has no bfloat16).
_INT_VIEWS = {
    torch.float16: torch.int16, torch.bfloat16: torch.int16,
    torch.float32: torch.int32, torch.float64: torch.int64,
}  # fmt: skip
_IS_CPU = operator.attrgetter("is_cpu")


def _one_dtype(tensors: list[torch.Tensor]) -> torch.dtype | None:
    """The tensors' single bucket dtype when they all share it, else None (one pass)."""
    try:
        dtypes = {t.dtype for t in tensors}
    except AttributeError:  # not a tensor: the full check names it
        return None
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    return dtype if dtype in _BUCKET_DTYPES else None


def _on_device(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every tensor is on ``device`` (one pass; no device objects made on CPU)."""
    if device.type == "cpu":
        return all(map(_IS_CPU, tensors))
    return {t.device for t in tensors} == {device}


def _is_bucket(flat: torch.Tensor) -> bool:
    return flat.dim() == 1 and flat.is_contiguous() and flat.dtype in _BUCKET_DTYPES


def _fixed_alias(out: torch.Tensor) -> torch.Tensor | None:
    """``out``'s memory under a storage that cannot grow (numpy's), or None (not on CPU, no
    numpy). ``torch.cat(..., out=alias)`` of more elements than ``out`` holds then raises before
    writing instead of reallocating the storage ``out`` shares with its bucket."""
    if not out.is_cpu:
        return None
    try:
        return torch.from_numpy(out.detach().view(_INT_VIEWS[out.dtype]).numpy()).view(out.dtype)
    except (RuntimeError, TypeError, ValueError, KeyError):
        return None


def _pack_direct(tensors: list[torch.Tensor], out: torch.Tensor, scale: float, dtype: torch.dtype) -> bool:
    """One ``torch.cat`` into ``out`` then one in-place ``mul_`` (the best plain sequence), where
    that rounds once and the tensors are 1-D; False otherwise, and where they do not hold
    ``out.numel()`` elements in all (nothing written where they hold more or cat refuses them;
    where they hold fewer, cat has filled the head of ``out`` and the full check raises)."""
    if not (dtype == out.dtype or (_holds_exactly(dtype, out.dtype) and out.dtype not in _HALF_DTYPES)):
        return False
    if tensors[0].dim() != 1 or tensors[0].numel() == 0:  # then cat refuses any non-1-D tensor
        return False
    alias = _fixed_alias(out)
    if alias is None:
        if sum(map(torch.Tensor.numel, tensors)) != out.numel():
            return False
        alias = out
    try:
        torch.cat(tensors, out=alias)
    except RuntimeError:  # an N-D tensor, another device, too many elements: before writing
        return False
    if alias.numel() != out.numel():  # too few: cat shrank the alias, not out
        return False
    if scale != 1.0:
        out.mul_(scale)
    return True


def _flatten(
    tensors: list[torch.Tensor], flat: torch.Tensor, numel: int, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """The tensors flattened into one new 1-D tensor of ``numel`` elements, or None off the
    fast path (``flat`` is the bucket they go to; ``dtype``: their one dtype, when known)."""
    if not tensors or not _is_bucket(flat) or (dtype or _one_dtype(tensors)) is None:
        return None
    try:
        joined = torch.cat(tensors) if tensors[0].dim() == 1 else None
        if joined is None or joined.dim() != 1:  # N-D tensors: flattened by a C++ loop
            joined = torch._C._nn.flatten_dense_tensors(tensors)
    except RuntimeError:  # tensors on several devices: the full check says which
        return None
    ok = joined.numel() == numel and joined.device == flat.device
    return joined if ok else None


def _scale_into(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    """``dst = round_to_dst(opmath(src) * opmath(scale))``, one rounding, whole buffers."""
    if scale == 1.0:
        dst.copy_(src)
    elif src.dtype == dst.dtype or _opmath(src.dtype, dst.dtype) == src.dtype:
        # Computed in src's dtype, which is the opmath here (or half with a float opmath kernel
        # that keeps the scalar in float), then cast: one rounding to dst after the product.
        torch.mul(src, scale, out=dst)
    elif _holds_exactly(src.dtype, dst.dtype) and dst.dtype not in _HALF_DTYPES:
        dst.copy_(src)  # exact widening into the opmath dtype
        dst.mul_(scale)
    else:  # half to the other half: the product in float32
        torch.mul(src.to(torch.float32), scale, out=dst)


def _scaled(src: torch.Tensor, dst_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``opmath(src) * opmath(scale)`` in a dtype whose cast to ``dst_dtype`` rounds once."""
    if scale == 1.0:
        return src
    if src.dtype == dst_dtype or _opmath(src.dtype, dst_dtype) == src.dtype:
        return torch.mul(src, scale)
    return src.to(_opmath(src.dtype, dst_dtype)).mul_(scale)


def _pack_pure(
    tensors: list[torch.Tensor], out: torch.Tensor, scale: float, known: torch.dtype | None = None
) -> None:
    """``known``: the tensors' one dtype as the caller states it (not checked per tensor)."""
    with torch.no_grad():
        dtype = (known or _one_dtype(tensors)) if tensors and _is_bucket(out) else None
        if dtype is not None and _pack_direct(tensors, out, scale, dtype):
            return
        joined = None if dtype is None else _flatten(tensors, out, out.numel(), dtype)
        if joined is not None:
            _scale_into(joined, out, scale)
            return
        _check_bucket("whale.pack", out, "out", tensors, written=False)
        _pack_general(tensors, out, scale)


def _pack_shards_pure(
    tensors: list[torch.Tensor], out: torch.Tensor, sizes: list[int], scale: float,
    known: torch.dtype | None = None,
) -> None:
    world, total = len(sizes), sum(sizes)
    slot = out.numel() // world
    with torch.no_grad():
        joined = _flatten(tensors, out, total, known)
        if joined is None:
            _check_bucket("whale.pack_shards", out, "out", tensors, written=False, shards=sizes)
            joined = torch.empty(total, dtype=out.dtype, device=out.device)
            _pack_general(tensors, joined, scale)
            scale = 1.0
        if slot * world == total:  # every shard fills its slot: the plain layout
            _scale_into(joined, out, scale)
            return
        slots = out.view(world, slot)
        start = 0
        for r, size in enumerate(sizes):
            _scale_into(joined[start : start + size], slots[r, :size], scale)
            slots[r, size:].zero_()
            start += size


def _unpack_pure(
    flat: torch.Tensor, tensors: list[torch.Tensor], scale: float, op: str = "whale.unpack",
    shards: list[int] | None = None,
) -> None:
    with torch.no_grad():
        numel = flat.numel() if shards is None else sum(shards)
        dtype = _one_dtype(tensors) if tensors and _is_bucket(flat) else None
        if dtype is not None and _on_device(tensors, flat.device):
            numels = list(map(torch.Tensor.numel, tensors))
            if sum(numels) == numel and _unpack_fast(_gather_shards(flat, shards), tensors, numels, dtype, scale):
                return
        _check_bucket(op, flat, "flat", tensors, written=True, shards=shards)
        _unpack_general(_gather_shards(flat, shards), tensors, scale)


def _unpack_fast(
    flat: torch.Tensor, tensors: list[torch.Tensor], numels: list[int], dtype: torch.dtype, scale: float
) -> bool:
    """Scale ``flat`` once, then one ``_foreach_copy_`` of its pieces into the tensors: split
    1-D pieces where the tensors are 1-D (an N-D one makes copy_ refuse its piece, and the
    N-D views of ``unflatten_dense_tensors`` serve: every tensor is written again), False if
    copy_ refuses a tensor (overlapping memory: the full check says which)."""
    src = _scaled(flat, dtype, scale)
    if tensors[0].dim() == 1:
        try:
            # Broadcasting a piece into a tensor of as many elements keeps their order.
            torch._foreach_copy_(tensors, src.split_with_sizes(numels))
            return True
        except RuntimeError:
            pass
    try:
        torch._foreach_copy_(tensors, torch._C._nn.unflatten_dense_tensors(src, tensors))
    except RuntimeError:
        return False
    return True


def _unpack_shards_pure(
    flat: torch.Tensor, tensors: list[torch.Tensor], sizes: list[int], scale: float
) -> None:
    _unpack_pure(flat, tensors, scale, op="whale.unpack_shards", shards=sizes)


def _gather_shards(flat: torch.Tensor, shards: list[int] | None) -> torch.Tensor:
    """The logical flat of a padded-shard buffer (``flat`` itself when nothing is padded)."""
    if shards is None:
        return flat
    world = len(shards)
    slot = flat.numel() // world
    if slot * world == sum(shards):
        return flat
    slots = flat.view(world, slot)
    return torch.cat([slots[r, :size] for r, size in enumerate(shards)])


def _pack_general(tensors: list[torch.Tensor], out: torch.Tensor, scale: float) -> None:
    if not tensors:
        return
    flats = [t.reshape(-1) for t in tensors]
    if scale == 1.0:
        torch.cat(flats, out=out)
    elif all(_holds_exactly(t.dtype, out.dtype) for t in tensors):
        # Exact cast first, then one rounding in out's dtype: no temporary.
        torch.cat(flats, out=out)
        out.mul_(scale)
    else:
        # Narrowing: the product must be rounded once, from opmath, so it needs a temporary.
        wide = [f.to(_opmath(f.dtype, out.dtype)) for f in flats]
        torch.cat(torch._foreach_mul(wide, scale), out=out)


def _unpack_general(flat: torch.Tensor, tensors: list[torch.Tensor], scale: float) -> None:
    if not tensors:
        return
    pieces = torch.split(flat, [t.numel() for t in tensors])
    views = [piece.view(t.shape) for piece, t in zip(pieces, tensors)]
    if scale == 1.0:
        torch._foreach_copy_(tensors, views)
    elif all(_holds_exactly(flat.dtype, t.dtype) and t.dtype not in _HALF_DTYPES for t in tensors):
        torch._foreach_copy_(tensors, views)
        torch._foreach_mul_(tensors, scale)
    else:
        # In-place _foreach_mul_ on half/bfloat16 rounds the scale to their dtype first (CPU),
        # so those products are made out of place in opmath and rounded once by the copy.
        wide = [v.to(_opmath(flat.dtype, t.dtype)) for v, t in zip(views, tensors)]
        torch._foreach_copy_(tensors, torch._foreach_mul(wide, scale))
