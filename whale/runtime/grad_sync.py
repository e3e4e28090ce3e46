"""Bucketed gradient all-reduce that runs while backward is still computing (as DDP does).

Parameters are grouped into flat buckets in reverse registration order (roughly the order in
which backward produces their gradients). Each parameter's gradient becomes a view into its
bucket, so a finished bucket is all-reduced in place with no copy; after an optimizer's
``zero_grad(set_to_none=True)`` the fresh gradients are packed back into the bucket with one
fused call (``torch.ops.whale.pack`` where the extension is built). Buckets are launched in index
order on every rank, so collectives always match even if gradients arrive in another order.

A caller may reserve a few extra elements at the end of the last bucket (``extra_numel``):
whatever it writes there before backward is summed with the gradients, with no collective of
its own (the data-parallel program sends the step's loss that way).

After the reserved elements the last bucket carries one flag per parameter: 1 where this rank's
step used it. A parameter one rank did not use contributes zeros to the sum; one that no rank
used keeps no gradient (``None``), as on the local model, so an optimizer leaves it as it was
(as DDP leaves a globally unused parameter's gradient untouched).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import comm_ops
from .host_reduce import HostLink, HostReduce, HostReduceUnavailable

__all__ = ["GradientReducer", "bucket_parts", "drop_unused_gradients"]


class _Bucket:
    __slots__ = ("buffer", "comm", "extra", "flags", "grads", "params", "ready", "views")

    def __init__(self, params: list[nn.Parameter], buffer: torch.Tensor, comm_dtype: torch.dtype | None,
                 extra_numel: int = 0) -> None:
        self.params = params
        numel = sum(p.numel() for p in params)
        self.buffer = buffer.zero_()
        self.grads = self.buffer[:numel]  # the gradients' part; then the caller's, then the flags
        self.extra = self.buffer[numel : numel + extra_numel]
        self.flags = self.buffer[numel + extra_numel :]
        self.views: list[torch.Tensor] = []
        at = 0
        for p in params:
            self.views.append(self.buffer[at : at + p.numel()].view_as(p))
            at += p.numel()
        needs_cast = comm_dtype is not None and comm_dtype != self.buffer.dtype
        self.comm = torch.empty_like(self.buffer, dtype=comm_dtype) if needs_cast else None
        self.ready: set[int] = set()


def bucket_parts(params: Sequence[nn.Parameter], cap: int, first_cap: int) -> list[list[nn.Parameter]]:
    """Parameters that need gradients grouped into buckets as DDP groups them: reverse
    registration order (the order backward makes their gradients), a bucket closed once it holds
    ``cap`` bytes (the first one's ``first_cap``, small so communication starts early) or where
    the dtype or device changes."""
    parts: list[list[nn.Parameter]] = []
    size, full = 0, True
    for p in reversed([p for p in params if p.requires_grad]):
        if full or (p.dtype, p.device) != (parts[-1][0].dtype, parts[-1][0].device):
            parts.append([])
            size = 0
        parts[-1].append(p)
        size += p.numel() * p.element_size()
        full = size >= (first_cap if len(parts) == 1 else cap)
    return parts


def drop_unused_gradients(holders: Sequence[torch.Tensor], unused: Sequence[int], summed: torch.Tensor) -> None:
    """``summed``: a used flag per entry of ``holders`` (the tensors whose ``.grad`` an optimizer
    steps: parameters, or their ZeRO shards) summed over the group; of those at the indices
    ``unused`` (this rank did not use them), each that no rank used keeps no gradient, as the
    local model leaves it, so an optimizer leaves it as it was."""
    if unused:  # only a rank that did not use a parameter can find that none did
        counts = summed.tolist()
        for k in unused:
            if counts[k] == 0:
                holders[k].grad = None


class GradientReducer:
    """Sums gradients over ``group`` during backward, bucket by bucket.

    Args:
        params: the parameters to synchronize, in registration order.
        group: the process group to reduce over (None: the default group).
        bucket_cap_bytes: size at which a bucket is closed.
        first_bucket_cap_bytes: size of the first bucket, small so communication starts early.
        comm_dtype: dtype gradients travel in; None keeps the parameters' dtype.
        extra_numel: elements reserved after the last bucket's gradients (see :attr:`extra`).
        host: the same ranks as ``group``, all on this host (:class:`~.host_reduce.HostLink`):
            CPU gradients are then summed through shared memory instead of over ``group``,
            unless they travel in another dtype or shared memory is short (then ``group``
            serves, with a warning).

    Usage: call :meth:`begin` before the backward whose gradients are final for the step (the
    last micro-batch's), then :meth:`finish` after it; backwards outside that window accumulate
    locally without communication.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: dist.ProcessGroup | None = None,
        *,
        bucket_cap_bytes: int = 25 * 2**20,
        first_bucket_cap_bytes: int = 2**20,
        comm_dtype: torch.dtype | None = None,
        extra_numel: int = 0,
        host: HostLink | None = None,
    ) -> None:
        self.group = group
        self.buckets: list[_Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}
        self._active = False
        self._next = 0
        self._works: list[tuple[_Bucket, dist.Work]] = []
        self._handles = []
        # Called before each bucket leaves; an emulated slow rank idles there
        # (:meth:`whale.runtime.emulate.Stretch.catch_up`), so its gradients leave when a slow
        # device's would.
        self.pace: Callable[[], None] | None = None
        parts = bucket_parts(params, bucket_cap_bytes, first_bucket_cap_bytes)  # each bucket's parameters
        if extra_numel and not parts:
            raise ValueError("GradientReducer(extra_numel=...) needs a parameter that requires grad")
        # The last bucket (launched last) also carries the caller's elements and a used flag per
        # parameter: a sum above zero in any float dtype means some rank used it.
        tail = extra_numel + sum(len(part) for part in parts)
        sizes = [(sum(p.numel() for p in part) + (tail if k == len(parts) - 1 else 0), part[0].dtype)
                 for k, part in enumerate(parts)]
        self._host = self._host_reduce(sizes, host, comm_dtype, [part[0].device for part in parts])
        for k, part in enumerate(parts):
            numel, dtype = sizes[k]
            buffer = self._host.buffer(k) if self._host else torch.empty(numel, dtype=dtype, device=part[0].device)
            self.buckets.append(_Bucket(part, buffer, comm_dtype, extra_numel if k == len(parts) - 1 else 0))
        self._unused: list[int] = []  # flags (parameters in bucket order) this rank's step did not use
        self._params = [p for bucket in self.buckets for p in bucket.params]  # in flag order
        for b, bucket in enumerate(self.buckets):
            for i, p in enumerate(bucket.params):
                self._where[id(p)] = (b, i)
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    @staticmethod
    def _host_reduce(sizes, host, comm_dtype, devices) -> HostReduce | None:
        if host is None or any(d.type != "cpu" for d in devices):
            return None
        if comm_dtype is not None and any(dtype != comm_dtype for _, dtype in sizes):
            return None  # gradients travel cast: the process group carries them
        try:
            return HostReduce(sizes, host)
        except HostReduceUnavailable as err:
            warnings.warn(
                f"gradients are all-reduced over sockets, not shared memory: {err}. Give /dev/shm "
                "more room (e.g. docker run --shm-size=...) or pass Config(shared_memory=False)",
                stacklevel=3,
            )
            return None

    @property
    def extra(self) -> torch.Tensor:
        """The reserved elements (in the parameters' dtype, travelling in ``comm_dtype``):
        write them before the synchronizing backward, read their sum over the group after
        :meth:`finish`."""
        return self.buckets[-1].extra

    def begin(self) -> None:
        """Start a synchronizing backward: buckets go out as their gradients become final."""
        assert not self._active, "begin() twice without finish()"
        for bucket in self.buckets:
            bucket.ready.clear()
        self._next = 0
        self._works.clear()
        self._unused.clear()
        self._active = True

    def finish(self) -> None:
        """Launch what backward did not (unused parameters), wait, and leave gradients summed;
        a parameter no rank used is left with no gradient."""
        assert self._active, "finish() without begin()"
        first = sum(len(bucket.params) for bucket in self.buckets[: self._next])  # flag of its first parameter
        for bucket in self.buckets[self._next :]:
            for i, p in enumerate(bucket.params):
                if i not in bucket.ready and p.grad is None:
                    # A parameter this step did not use contributes zeros, as DDP's unused ones do.
                    bucket.views[i].zero_()
                    p.grad = bucket.views[i]
                    self._unused.append(first + i)
            bucket.ready.update(range(len(bucket.params)))
            first += len(bucket.params)
        self._launch_ready()
        for bucket, work in self._works:
            work.wait()
            if bucket.comm is not None:
                comm_ops.unpack(bucket.comm, [bucket.buffer], 1.0)
        self._works.clear()
        self._active = False
        drop_unused_gradients(self._params, self._unused, self.buckets[-1].flags)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self._active:
            return
        b, i = self._where[id(param)]
        self.buckets[b].ready.add(i)
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if len(bucket.ready) < len(bucket.params):
                return
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int) -> None:
        if self.pace is not None:
            self.pace()
        bucket = self.buckets[b]
        if b == len(self.buckets) - 1:  # every bucket's parameters are known used or not by now
            bucket.flags.fill_(1)
            bucket.flags[self._unused] = 0
        fresh = [i for i, (p, v) in enumerate(zip(bucket.params, bucket.views)) if p.grad.data_ptr() != v.data_ptr()]
        if len(fresh) == len(bucket.params):
            # All fresh (after zero_grad(set_to_none=True)): one fused pack into the bucket.
            comm_ops.pack([p.grad for p in bucket.params], bucket.grads, 1.0, dtype=bucket.params[0].dtype)
        elif fresh:
            torch._foreach_copy_([bucket.views[i] for i in fresh], [bucket.params[i].grad for i in fresh])
        for i in fresh:
            bucket.params[i].grad = bucket.views[i]
        if self._host is not None:
            self._works.append((bucket, self._host.start(b)))
            return
        payload = bucket.buffer
        if bucket.comm is not None:
            comm_ops.pack([bucket.buffer], bucket.comm, 1.0)
            payload = bucket.comm
        self._works.append((bucket, dist.all_reduce(payload, group=self.group, async_op=True)))
