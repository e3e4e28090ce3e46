"""Start a benchmark's ranks: ``world`` gloo processes on this host, each running one worker."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import whale as wh

__all__ = ["run_on_ranks"]


def run_on_ranks(worker: Callable[..., None], args: Any, *extra: Any, world: int = 2, threads: int = 1) -> Any:
    """Run ``worker(rank, world, args, results, *extra)`` on ``world`` spawned ranks after
    ``wh.init("gloo")``, with ``threads`` torch threads each; what a rank puts into ``results``
    first is returned. ``worker`` must be a module-level function (it is pickled)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    ranks = mp.start_processes(
        _entry, args=(world, port, threads, worker, args, results, extra), nprocs=world, start_method="spawn", join=False
    )
    # Read before joining: a result larger than the pipe's buffer blocks its rank until read.
    result = results.get()
    while not ranks.join():
        pass
    return result


def _entry(rank: int, world: int, port: int, threads: int, worker, args, results, extra) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    wh.init("gloo")
    try:
        worker(rank, world, args, results, *extra)
    finally:
        dist.destroy_process_group()
