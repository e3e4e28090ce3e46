"""Start a benchmark's ranks: ``world`` gloo processes on this host, each running one worker.

A rank that raises reports its traceback and the launcher ends every rank and raises
:class:`RankFailed` naming it; a rank that dies without a word (killed, ``os._exit``) is named
by its exit code. Nothing waits forever on a rank that will never answer.
"""

from __future__ import annotations

import os
import queue
import resource
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import whale as wh

__all__ = ["HostLoad", "RankFailed", "run_on_ranks", "seconds_per_step"]

_POLL_S = 0.2
_GRACE_S = 1.0


def seconds_per_step(step_fn: Callable[..., Any], opt, batches, warmup: int) -> float:
    """Seconds per training step (``step_fn(x, y)``, ``opt.step()``, ``opt.zero_grad()``) over
    ``batches[warmup:]``, from a barrier before the first timed step to one after the last."""
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            dist.barrier()
            start = time.perf_counter()
        step_fn(x, y)
        opt.step()
        opt.zero_grad()
    dist.barrier()
    return (time.perf_counter() - start) / (len(batches) - warmup)


class HostLoad:
    """How much of this host's CPU other processes took while a benchmark ran, and how much the
    hypervisor held back (steal), from ``/proc/stat`` against this process's CPU time and that
    of its children once joined (the benchmark's ranks). A timing on a host that others load is
    not one of whale's: print :meth:`describe` beside the numbers.

    Example::

        load = HostLoad()
        run_the_benchmark()
        print(load.describe())
        # other processes took 3% of the host's 2 cores during the run; the hypervisor held back 0% (steal)
    """

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float, float] | None:
        """``(wall s, busy s of all cores, steal s, this process's and its children's CPU s)``."""
        try:
            with open("/proc/stat", encoding="ascii") as file:
                fields = [int(v) for v in file.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        ours = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))  # fmt: skip
        return time.monotonic(), (user + nice + system + irq + softirq) / tick, steal / tick, ours

    def shares(self) -> tuple[float, float] | None:
        """``(others, steal)``: shares of the host's cores since construction; None where the
        system keeps no ``/proc/stat``."""
        end = self._snapshot()
        if self._start is None or end is None:
            return None
        capacity = (end[0] - self._start[0]) * (os.cpu_count() or 1)
        others = (end[1] - self._start[1]) - (end[3] - self._start[3])
        return max(0.0, others / capacity), (end[2] - self._start[2]) / capacity

    def describe(self) -> str:
        found = self.shares()
        if found is None:
            return "other processes' load: unknown (no /proc/stat)"
        others, steal = found
        return (f"other processes took {others:.0%} of the host's {os.cpu_count()} cores during the run; "
                f"the hypervisor held back {steal:.0%} (steal)")


class RankFailed(RuntimeError):
    """A benchmark rank raised or died; the message names the rank and holds its traceback."""


def run_on_ranks(
    worker: Callable[..., None], args: Any, *extra: Any, world: int = 2, threads: int = 1,
    timeout_s: float | None = None, pin: bool = False,
) -> Any:
    """Run ``worker(rank, world, args, results, *extra)`` on ``world`` spawned ranks after
    ``wh.init("gloo")``, with ``threads`` torch threads each; what a rank puts into ``results``
    first is returned. ``worker`` must be a module-level function (it is pickled).

    ``pin``: rank ``r`` runs on cores ``r * threads`` to ``(r + 1) * threads - 1`` only (as each
    rank of a GPU job has its own device), where the host has that many cores and the system
    lets the process choose; otherwise the scheduler places the ranks. Unpinned, a rank moves
    between cores that need not run alike (a virtual machine's cores share physical ones), so a
    speed it measured at one moment need not hold for the run.

    Raises:
        RankFailed: a rank raised (its traceback is in the message), exited before every rank
            finished, or ``timeout_s`` passed; every rank is ended first.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results, errors = ctx.Queue(), ctx.Queue()
    ranks = mp.start_processes(
        _entry, args=(world, port, threads, worker, args, results, errors, extra, pin), nprocs=world,
        start_method="spawn", join=False,
    )  # fmt: skip
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    result, got = None, False
    try:
        while True:
            # Read before joining: a result larger than the pipe's buffer blocks its rank until read.
            if not got:
                try:
                    result, got = results.get(timeout=_POLL_S), True
                except queue.Empty:
                    pass
            _raise_failure(ranks, errors, deadline, timeout_s)
            if got and all(not p.is_alive() for p in ranks.processes):
                break
            if got:
                time.sleep(_POLL_S)
        if not got:  # every rank ended cleanly but none answered
            raise RankFailed("every rank finished, but none put a result")
        return result
    finally:
        _end(ranks)


def _raise_failure(ranks, errors, deadline: float | None, timeout_s: float | None) -> None:
    failed = not errors.empty() or any(not p.is_alive() and p.exitcode != 0 for p in ranks.processes)
    if failed:
        # The first failure makes its peers fail too (their collectives break): wait a moment
        # for every rank's word, then name the ranks that died silently first, then the errors
        # in the order they came.
        time.sleep(_GRACE_S)
        raised: dict[int, str] = {}
        while True:
            try:
                rank, text = errors.get(timeout=_POLL_S)
            except queue.Empty:
                break
            raised.setdefault(rank, text)
        silent = [
            f"benchmark rank {r} exited with code {p.exitcode} without a Python error "
            "(killed, out of memory, or os._exit)"
            for r, p in enumerate(ranks.processes)
            if r not in raised and not p.is_alive() and p.exitcode != 0
        ]
        parts = silent + [f"benchmark rank {r} raised:\n{text}" for r, text in raised.items()]
        raise RankFailed("\n".join(parts))
    if deadline is not None and time.monotonic() > deadline:
        alive = [r for r, p in enumerate(ranks.processes) if p.is_alive()]
        raise RankFailed(f"benchmark ranks {alive} did not finish within {timeout_s} s")


def _end(ranks) -> None:
    for p in ranks.processes:
        if p.is_alive():
            p.terminate()
    for p in ranks.processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    # torch's spawn gives each rank a file in the temporary directory for its traceback and
    # removes none (its own join would read them; the tracebacks came through ``errors``).
    for name in ranks.error_files:
        if name and os.path.exists(name):
            os.unlink(name)


def _entry(rank: int, world: int, port: int, threads: int, worker, args, results, errors, extra, pin) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if pin and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= world * threads:
            os.sched_setaffinity(0, cores[rank * threads : (rank + 1) * threads])
    torch.set_num_threads(threads)
    try:
        wh.init("gloo")
        worker(rank, world, args, results, *extra)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
