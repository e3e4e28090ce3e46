"""Fused gradient-bucket kernels: pack a bucket's gradients into one flat buffer and back.

The data-parallel reducer packs each bucket's gradients, scaled by the replica's weight
(``rows_r / global_rows``) and cast to the communication dtype, into one flat buffer,
all-reduces it, and unpacks it. Two backends do the same arithmetic, bit for bit:

- ``"extension"``: ``torch.ops.whale.pack`` / ``unpack`` from ``csrc/`` — one pass per tensor
  on CPU, one fused launch per bucket on CUDA (where a non-contiguous tensor costs one extra
  copy). Built by :func:`build_extension` (``whale build-ext``), loaded from torch's extension
  cache afterwards.
- ``"pure"``: ``torch.cat(out=)`` and ``torch._foreach_*`` ops, used where the extension is not
  built (or ``WHALE_DISABLE_EXT=1``).

Arithmetic: every element is ``round_to_dst(opmath(x) * opmath(scale))``, where opmath is
float64 if either side is float64 and float32 otherwise (as torch's own half/bfloat16
kernels), so each value is rounded once.

Example::

    flat = torch.empty(sum(g.numel() for g in grads), dtype=torch.bfloat16)
    pack(grads, flat, scale=rows / global_rows)
    dist.all_reduce(flat)
    unpack(flat, grads)
"""

from __future__ import annotations

import functools
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import csrc_build

__all__ = ["backend", "build_extension", "extension_available", "pack", "unpack"]

_DISABLE_ENV = "WHALE_DISABLE_EXT"
_BUCKET_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BUCKET_DTYPE_NAMES = "torch.float16, torch.bfloat16, torch.float32 or torch.float64"
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Write ``scale * t``, flattened, for each tensor consecutively into ``out``.

    Args:
        tensors: floating tensors on ``out``'s device, any shapes and strides, any floating dtypes.
        out: 1-D contiguous floating tensor with ``sum(t.numel())`` elements; may have another
            dtype than the tensors (the values are cast, rounded once).
        scale: factor applied to every element.

    Returns:
        ``out``.

    Raises:
        ValueError: shapes, sizes or devices do not fit (the message says which tensor).
        TypeError: a dtype is not floating, or ``scale`` is not a real number.

    Example::

        out = pack([torch.ones(2, 2), torch.ones(3)], torch.empty(7, dtype=torch.bfloat16), 0.5)
    """
    tensors = list(tensors)
    scale = _check_scale("whale.pack", scale)
    if _use_extension(out.device):
        torch.ops.whale.pack(tensors, out, scale)
    else:
        _check_bucket("whale.pack", out, "out", tensors, written=False)
        _pack_pure(tensors, out, scale)
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
        torch.ops.whale.unpack(flat, tensors, scale)
    else:
        _check_bucket("whale.unpack", flat, "flat", tensors, written=True)
        _unpack_pure(flat, tensors, scale)
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


def _check_scale(op: str, scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number, got {type(scale).__name__}")
    return float(scale)


def _check_bucket(
    op: str, flat: torch.Tensor, flat_name: str, tensors: list[torch.Tensor], written: bool
) -> None:
    """The extension's ``check_bucket`` (csrc/whale_ops.cpp), with the same messages."""
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
    if total != flat.numel():
        raise ValueError(
            f"{op}: the tensors hold {total} elements in total but {flat_name} has "
            f"{flat.numel()}; size {flat_name} to sum(t.numel() for t in tensors)"
        )


def _opmath(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _holds_exactly(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every ``src`` value is a ``dst`` value (the cast is exact)."""
    return src == dst or dst == torch.float64 or (dst == torch.float32 and src in _HALF_DTYPES)


def _pack_pure(tensors: list[torch.Tensor], out: torch.Tensor, scale: float) -> None:
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


def _unpack_pure(flat: torch.Tensor, tensors: list[torch.Tensor], scale: float) -> None:
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
