"""Point-to-point transfers between pipeline stages: a header once per shape, then data only.

Tensors crossing the boundary from stage ``s`` to ``s + 1`` travel with a small header (shape,
dtype, requires-grad per tensor) the first time that boundary sees a micro-batch of a given
input shape; both ends cache it under the micro-batch's input shapes (a ``shape_key``), so
later micro-batches of that shape, in this step or any later one, send only the data. The
gradients sent back over the boundary are those of the activations that require grad, so their
shapes follow from the same cached header on both ends.

A receive whose shapes are known is posted at once (``irecv``) and waited only by the compute
that reads it. Posting early matters: gloo moves a message only once both its send and its
receive are posted, so a receive posted late makes the reader wait the whole transfer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Incoming", "Transfers", "shape_key"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8)
_MAX_DIMS = 8
_ACT, _GRAD = 0, 1

Spec = tuple[tuple[int, ...], torch.dtype, bool]  # shape, dtype, requires grad


def shape_key(value: Any) -> tuple:
    """What determines the activations' shapes: every input tensor's shape and dtype, and the
    value of every other (scalar) input."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(shape_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, shape_key(v)) for k, v in value.items()))
    return (type(value).__name__, repr(value))


@dataclasses.dataclass
class Incoming:
    """The tensors of one received message, filled once :meth:`wait` returns."""

    tensors: list[torch.Tensor]
    works: list[dist.Work]

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        self.works = []
        return self.tensors


class Transfers:
    """Sends and receives of one rank's pipeline stages, with the boundary headers cached.

    Every method takes the sending stage ``stage`` of the boundary (``stage -> stage + 1``)
    and the micro-batch's ``shape_key``; ``mb`` only makes tags unique.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._specs: dict[tuple[int, tuple], list[Spec]] = {}
        # The default group's own send and recv: ``dist.isend``'s checks cost more than the
        # post itself, once per tensor and micro-batch.
        self._group = dist.group.WORLD

    def knows(self, stage: int, key: tuple) -> bool:
        """Whether a receive over boundary ``stage`` can be posted without a header."""
        return (stage, key) in self._specs

    def send_activations(self, tensors: list[torch.Tensor], peer: int, stage: int, mb: int, key: tuple) -> list:
        """Post the sends of ``tensors`` (and of their header, the first time); the works."""
        works = []
        if (stage, key) not in self._specs:
            header = _header(tensors)
            self._specs[(stage, key)] = _specs(header)
            works.append((dist.isend(header, peer, tag=_tag(_ACT, stage, mb, 63, True)), header))
        return works + self._isend(tensors, peer, _ACT, stage, mb)

    def send_grads(self, tensors: list[torch.Tensor], peer: int, stage: int, mb: int) -> list:
        """Post the sends of the gradients of boundary ``stage``'s activations that require grad."""
        return self._isend(tensors, peer, _GRAD, stage, mb)

    def recv_activations(self, peer: int, stage: int, mb: int, key: tuple, count: int) -> Incoming:
        """Post the receives of ``count`` activations; the first time, wait for the header."""
        if (stage, key) not in self._specs:
            header = torch.empty((count, 3 + _MAX_DIMS), dtype=torch.int64)
            dist.recv(header, peer, tag=_tag(_ACT, stage, mb, 63, True))
            self._specs[(stage, key)] = _specs(header)
        return self._irecv(self._specs[(stage, key)], peer, _ACT, stage, mb)

    def recv_grads(self, peer: int, stage: int, mb: int, key: tuple) -> Incoming:
        """Post the receives of the gradients of the activations this rank sent over ``stage``."""
        specs = [(shape, dtype, False) for shape, dtype, grad in self._specs[(stage, key)] if grad]
        return self._irecv(specs, peer, _GRAD, stage, mb)

    def _irecv(self, specs: list[Spec], peer: int, kind: int, stage: int, mb: int) -> Incoming:
        tensors, works = [], []
        for j, (shape, dtype, requires_grad) in enumerate(specs):
            t = torch.empty(shape, dtype=dtype, device=self._device)
            works.append(self._group.recv([t], peer, _tag(kind, stage, mb, j, False)))
            # A leaf, so the gradient of a received activation can be sent back.
            tensors.append(t.requires_grad_(requires_grad))
        return Incoming(tensors, works)

    def _isend(self, tensors: list[torch.Tensor], peer: int, kind: int, stage: int, mb: int) -> list:
        works = []
        for j, t in enumerate(tensors):
            t = t.detach().contiguous()
            works.append((self._group.send([t], peer, _tag(kind, stage, mb, j, False)), t))
        return works


def _tag(kind: int, stage: int, mb: int, index: int, header: bool) -> int:
    # Unique per message, so gloo matches sends and receives by tag, never by arrival order.
    return (((kind * 64 + stage) * 4096 + mb) * 64 + index) * 2 + int(header)


def _header(tensors: list[torch.Tensor]) -> torch.Tensor:
    header = torch.zeros((len(tensors), 3 + _MAX_DIMS), dtype=torch.int64)
    for j, t in enumerate(tensors):
        if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
            raise ValueError(
                f"a {t.dim()}-d {t.dtype} tensor crosses a stage boundary; whale sends up to "
                f"{_MAX_DIMS}-d tensors of {[str(d) for d in _DTYPES]}"
            )
        header[j, 0] = t.dim()
        header[j, 1] = _DTYPES.index(t.dtype)
        header[j, 2] = int(t.requires_grad)
        header[j, 3 : 3 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return header


def _specs(header: torch.Tensor) -> list[Spec]:
    specs = []
    for row in header.tolist():
        ndim = row[0]
        specs.append((tuple(row[3 : 3 + ndim]), _DTYPES[row[1]], bool(row[2])))
    return specs
