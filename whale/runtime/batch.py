"""Cutting batches into replicas' rows and micro-batches, and checking ranks agree on them."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from . import comm_ops

__all__ = [
    "RankAgreement",
    "batch_rows",
    "broadcast_tensors",
    "call_inputs",
    "digits_agree",
    "fingerprint_digits",
    "narrow",
    "signature",
    "to_device",
]


class RankAgreement:
    """Checks, without blocking, that all ranks passed matching batches; sums their rows.

    One small asynchronous all-reduce carries the rows and a shape fingerprint f with f**2:
    all ranks agree exactly when world * sum(f**2) == sum(f)**2 (equality in Cauchy-Schwarz).
    Started before forward and waited before the first backward, its latency hides behind
    compute; a mismatch still stops every rank before any gradient is exchanged.
    """

    def __init__(self, sig: int, my_rows: int, device: torch.device) -> None:
        f = sig % 2**20
        self._summed = torch.tensor([my_rows, f, f * f], dtype=torch.int64, device=device)
        self._work = dist.all_reduce(self._summed, async_op=True)
        self._total: int | None = None

    def wait(self) -> int:
        """The rows summed over all ranks; raises ValueError if the ranks' batches differ."""
        if self._total is None:
            self._work.wait()
            rows, f_sum, f2_sum = (int(v) for v in self._summed.tolist())
            if dist.get_world_size() * f2_sum != f_sum**2:
                raise ValueError(
                    f"rank {dist.get_rank()}: the ranks passed inputs whose shapes or dtypes "
                    "differ; every rank must pass the same global batch (or, with "
                    "batch='local', the rows cut by program.local_slice)"
                )
            self._total = rows
        return self._total


def fingerprint_digits(fingerprint: int) -> list[float]:
    """A 20-bit fingerprint as four 5-bit digits and their squares, ``[d0, d0**2, d1, ...]``.

    Summed over ranks they stay exact even in float32 (up to ~17,000 ranks), so they can ride
    on a gradient bucket; all ranks had the same fingerprint iff :func:`digits_agree`.
    """
    digits = [(fingerprint >> (5 * k)) & 31 for k in range(4)]
    return [float(v) for d in digits for v in (d, d * d)]


def digits_agree(summed: list[float], world: int) -> bool:
    """Whether summed :func:`fingerprint_digits` come from one fingerprint on every rank
    (equality in Cauchy-Schwarz: world * sum(d**2) == sum(d)**2 exactly when all d are equal)."""
    return all(world * round(summed[2 * k + 1]) == round(summed[2 * k]) ** 2 for k in range(4))


def call_inputs(inputs: Any, kwargs: Mapping[str, Any] | None = None) -> tuple[tuple, dict]:
    """A step's inputs as the model's ``(args, kwargs)``: a tuple is the positional inputs, a
    dict the keyword inputs, anything else the one positional input; ``kwargs`` are added to
    the keyword inputs.

    Example::

        >>> call_inputs({"input_ids": 1}, {"attention_mask": 2})
        ((), {'input_ids': 1, 'attention_mask': 2})
    """
    kwargs = dict(kwargs or {})
    if isinstance(inputs, Mapping):
        twice = sorted(set(inputs) & set(kwargs))
        if twice:
            raise TypeError(
                f"step(): keyword inputs {twice} are given both in the inputs dict and as keywords; "
                "pass each once"
            )
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"step(): a dict of inputs is keyword inputs by name; got keys {bad!r}")
        return (), {**inputs, **kwargs}
    if isinstance(inputs, tuple):
        return inputs, kwargs
    return (inputs,), kwargs


def batch_rows(args: tuple, target: Any, dim: int) -> int:
    tensors = [t for t in _flatten((args, target)) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        raise ValueError("step() got no tensor inputs with a batch dimension")
    rows = {t.shape[dim] for t in tensors}
    if len(rows) > 1:
        raise ValueError(
            f"step(): inputs and target disagree on the batch size along dim {dim}: "
            f"{[tuple(t.shape) for t in tensors]}; every tensor needs the same number of rows"
        )
    return rows.pop()


def _flatten(value: Any) -> list:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    return [value]


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value) if value.dim() > 0 else value
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def narrow(value: Any, dim: int, start: int, length: int) -> Any:
    return _map_tensors(value, lambda t: t.narrow(dim, start, length))


def to_device(value: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return value
    return _map_tensors(value, lambda t: t.to(device, non_blocking=True))


def signature(args: tuple, target: Any, rows_dim: int | None) -> int:
    """A stable fingerprint of shapes and dtypes; ``rows_dim`` (if given) is left out."""
    parts = []
    for t in _flatten((args, target)):
        if isinstance(t, torch.Tensor):
            shape = list(t.shape)
            if rows_dim is not None and shape:
                shape[rows_dim] = -1
            parts.append(f"{t.dtype}{shape}")
        else:
            parts.append(type(t).__name__)
    return zlib.crc32(";".join(parts).encode())


def broadcast_tensors(
    tensors: list[torch.Tensor], *, src: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Broadcast from ``src`` with one collective per dtype (packed flat), not one per tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, same in by_dtype.items():
        flat = torch.empty(sum(t.numel() for t in same), dtype=dtype, device=same[0].device)
        if dtype.is_floating_point:
            comm_ops.pack(same, flat, 1.0)
        else:
            torch.cat([t.reshape(-1) for t in same], out=flat)
        dist.broadcast(flat, src=src, group=group)
        if dtype.is_floating_point:
            comm_ops.unpack(flat, same, 1.0)
        else:
            at = 0
            for t in same:
                t.copy_(flat[at : at + t.numel()].view_as(t))
                at += t.numel()
