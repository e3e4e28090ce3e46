"""Cutting batches into replicas' rows and micro-batches, and moving them between ranks and devices."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from . import comm_ops

__all__ = [
    "batch_rows",
    "broadcast_tensors",
    "call_inputs",
    "narrow",
    "to_device",
]


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
            comm_ops.pack(same, flat, 1.0, dtype=dtype)
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
