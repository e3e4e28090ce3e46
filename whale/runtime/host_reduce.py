"""Summing CPU buffers of ranks on one host through shared memory instead of sockets.

gloo moves CPU tensors over TCP even between processes on one host: every byte is copied into
the kernel and out again, and a 12 MB all-reduce of 2 ranks takes ~7.5 ms on a 2-core host.
Here each rank's buffer lives in a shared-memory segment that every rank of the group maps.
An all-reduce is then two tiny barriers around one pass over memory: rank ``r`` sums chunk
``r`` of every segment and writes the sum back into chunk ``r`` of every segment (a
reduce-scatter and an all-gather in one pass, ~1.7 ms for the same 12 MB). Only rank ``r``
touches chunk ``r``, so no other synchronization is needed, and every rank ends with the same
bits. The work runs on a background thread, so backward keeps computing meanwhile, as with the
process group's asynchronous all-reduce.

Segments are files in ``/dev/shm``, unlinked as soon as every rank has mapped them, so nothing
is left behind whatever happens to the job. NCCL does the same between GPUs of one node on its
own; this path is for CPU training (gloo).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import os
import socket
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "HostLink",
    "HostReduce",
    "HostReduceUnavailable",
    "host_facts",
    "remove_named_segments",
    "shared_memory_free",
]

_SHM_DIR = "/dev/shm"
_names = itertools.count()


def host_facts() -> tuple[str, bool]:
    """This rank's host name and whether it has a shared-memory file system to use."""
    return socket.gethostname(), shared_memory_free() > 0


def shared_memory_free() -> int:
    """Bytes free in the shared-memory file system (0 where there is none)."""
    if not sys.platform.startswith("linux") or not os.path.isdir(_SHM_DIR):
        return 0
    stat = os.statvfs(_SHM_DIR)
    return stat.f_bavail * stat.f_frsize


class HostLink:
    """A group of ranks on one host and the one background thread that runs its all-reduces.

    Every :class:`HostReduce` of the group shares it, so the group's barriers are issued in
    the order the all-reduces were started, which is the same on every rank.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.flag = torch.zeros(1)
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="whale-host-reduce")

    def barrier(self) -> None:
        dist.all_reduce(self.flag, group=self.group)


class HostReduceUnavailable(RuntimeError):
    """Some rank of the group could not make its shared-memory segments (raised on every rank)."""


class HostReduce:
    """Flat buffers in shared memory, summed over the ranks of ``group`` on one host.

    Args:
        sizes_dtypes: ``(numel, dtype)`` of each buffer, the same on every rank.
        link: the ranks whose buffers are summed, all on this host (see :func:`host_facts`),
            in a group of their own: its barriers run on the link's background thread, so no
            other collective may use it.

    Every rank of the group constructs it (collective); if any rank cannot make its segments
    (e.g. ``/dev/shm`` is full), every rank raises :class:`HostReduceUnavailable`.
    :meth:`buffer` is this rank's buffer ``i``; :meth:`start` sums buffer ``i`` in place over
    the group, in the background.

    Example::

        host = HostReduce([(n, torch.float32)], HostLink(group))
        host.buffer(0).copy_(grads)
        host.start(0).wait()   # host.buffer(0) now holds the sum over the group
    """

    def __init__(self, sizes_dtypes: Sequence[tuple[int, torch.dtype]], link: HostLink) -> None:
        self._link = link
        group = link.group
        self._rank, self._size = link.rank, link.size
        wanted = [(int(n), str(d)) for n, d in sizes_dtypes]
        mine: list[tuple[str, torch.Tensor]] = []
        try:
            try:
                for numel, dtype in sizes_dtypes:
                    mine.append(_create_segment(numel, dtype))
                error = None
            except OSError as err:
                error = f"rank {dist.get_rank()}: {err}"
            names: list = [None] * self._size
            dist.all_gather_object(names, error or (wanted, [path for path, _ in mine]), group=group)
            failed = [n for n in names if isinstance(n, str)]
            if failed:
                raise HostReduceUnavailable("; ".join(failed))
            if any(n[0] != wanted for n in names):
                ranks = dist.get_process_group_ranks(group) if group is not None else range(self._size)
                raise ValueError(
                    "the ranks of a shared-memory gradient group made different buckets ("
                    + "; ".join(f"rank {r}: {len(n[0])} of {sum(c for c, _ in n[0]):,} elements" for r, n in zip(ranks, names))
                    + "); their Config (bucket_cap_mb, first_bucket_cap_mb, grad_comm_dtype) or "
                    "models differ: give every rank the same"
                )
            self._segments = [
                [seg if r == self._rank else _map(names[r][1][i], numel, dtype) for r in range(self._size)]
                for i, ((numel, dtype), (_, seg)) in enumerate(zip(sizes_dtypes, mine))
            ]
            dist.barrier(group=group)  # every rank has mapped every segment: the names can go
        finally:
            # Whatever happened, this rank's names go now: a mapping outlives its name, and
            # nothing is left in /dev/shm.
            for path, _ in mine:
                _unlink(path)

    def buffer(self, i: int) -> torch.Tensor:
        """This rank's buffer ``i`` (1-D, in shared memory)."""
        return self._segments[i][self._rank]

    def start(self, i: int) -> _Pending:
        """Sum buffer ``i`` over the group in place, on the background thread; ``wait()`` on
        the result returns when this rank's buffer holds the sum. Call it on every rank in the
        same order; do not write the buffer until then."""
        return _Pending(self._link.worker.submit(self._all_reduce, i))

    def _all_reduce(self, i: int) -> None:
        segments = self._segments[i]
        numel = segments[0].numel()
        lo, hi = self._rank * numel // self._size, (self._rank + 1) * numel // self._size
        self._link.barrier()  # every rank's buffer is final
        if hi > lo:
            chunk = segments[self._rank][lo:hi]
            for r, seg in enumerate(segments):
                if r != self._rank:
                    chunk.add_(seg[lo:hi])
            for r, seg in enumerate(segments):
                if r != self._rank:
                    seg[lo:hi].copy_(chunk)
        self._link.barrier()  # every chunk is in every buffer


class _Pending:
    """A started host all-reduce, waited like a process group's work."""

    __slots__ = ("_future",)

    def __init__(self, future: concurrent.futures.Future) -> None:
        self._future = future

    def wait(self) -> None:
        self._future.result()


def _create_segment(numel: int, dtype: torch.dtype) -> tuple[str, torch.Tensor]:
    path = os.path.join(_SHM_DIR, f"whale-{os.getpid()}-{next(_names)}")
    nbytes = max(1, numel) * torch.empty((), dtype=dtype).element_size()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    _named.add(path)
    try:
        # Reserve the pages now: a full /dev/shm fails here, not with SIGBUS mid-step.
        os.posix_fallocate(fd, 0, nbytes)
        return path, _map(path, numel, dtype)
    except BaseException:
        _unlink(path)
        raise
    finally:
        os.close(fd)


# Segments whose names exist: removed at exit too (an exception between creating and the
# final unlink, a watchdog ending the process), so none outlives its program.
_named: set[str] = set()


def _unlink(path: str) -> None:
    _named.discard(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_named_segments() -> None:
    """Unlink every segment this process created and has not unlinked yet (at exit)."""
    for path in list(_named):
        _unlink(path)


atexit.register(remove_named_segments)


def _map(path: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=max(1, numel), dtype=dtype)[:numel]
