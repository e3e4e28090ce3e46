"""A pool of real gloo processes shared by many test cases.

Starting processes costs seconds each on two cores, so a pool of ``world_size`` workers joins
one process group once and then runs case after case: ``pool.run("module:function", *args)``
calls the function on every rank and returns the per-rank results (or raises the error of the
lowest failing rank). A case that leaves the group unusable (a hang) times out, and the pool is
restarted for the next case; where a rank raised while another hung, its error is raised, the
hang named beside it. A case where one rank raised and another did not, or whose error says the
group failed under it, restarts the pool too.
"""

from __future__ import annotations

import gc
import importlib
import os
import queue
import socket
import sys
import traceback
from typing import Any

import torch.multiprocessing as mp

_CASE_TIMEOUT_S = float(os.environ.get("WHALE_TEST_CASE_TIMEOUT", "180"))


class CaseError(Exception):
    """A case raised on some rank; carries the exception type name and message."""

    def __init__(self, rank: int, type_name: str, message: str, tb: str, note: str = "") -> None:
        super().__init__(f"rank {rank}: {type_name}: {message}\n{tb}" + (f"\n({note})" if note else ""))
        self.rank, self.type_name, self.message = rank, type_name, message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results, root: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    sys.path.insert(0, root)
    import torch

    torch.set_num_threads(1)
    import whale as wh

    wh.init("gloo", timeout_s=_CASE_TIMEOUT_S)
    while True:
        task = tasks.get()
        if task is None:
            break
        target, args, kwargs = task
        module_name, fn_name = target.split(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as err:  # noqa: BLE001 - reported to the test process
            results.put((rank, False, (type(err).__name__, str(err), traceback.format_exc())))
    import torch.distributed as dist

    dist.destroy_process_group()
    # The interpreter's teardown collects over every object torch and transformers made, over a
    # second of a core per worker; frozen, they are left to the exit (a quarter of a second).
    gc.freeze()


def _broke_group(error: tuple[str, str, str]) -> bool:
    """Whether a rank's error says the process group failed under it (a peer gone, a wait the
    watchdog ended), not an error every rank raised alike before communicating."""
    type_name, message, _ = error
    return type_name in ("PeerWaitError", "DistBackendError") or any(
        marker in message for marker in ("Connection closed by peer", "Gloo", "gloo", "timed out", "Timed out")
    )


class WorldPool:
    """``world_size`` processes in one gloo group, running cases on request."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self._tasks[r], self._results, root),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, target: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``module:function(*args, **kwargs)`` on every rank; per-rank results in rank order."""
        if not all(p.is_alive() for p in self._procs):
            self._restart()
        for q in self._tasks:
            q.put((target, args, kwargs))
        got: dict[int, tuple[bool, Any]] = {}
        try:
            while len(got) < self.world_size:
                rank, ok, value = self._results.get(timeout=_CASE_TIMEOUT_S)
                got[rank] = (ok, value)
        except queue.Empty:
            self._restart()
            waited = f"{target} did not finish on ranks {sorted(set(range(self.world_size)) - set(got))} within {_CASE_TIMEOUT_S}s"
            failed = sorted(rank for rank, (ok, _) in got.items() if not ok)
            if failed:  # the error that left the others waiting, with the wait said beside it
                raise CaseError(failed[0], *got[failed[0]][1], note=waited) from None
            raise TimeoutError(waited) from None
        failed = [rank for rank in range(self.world_size) if not got[rank][0]]
        if failed:
            if len(failed) < self.world_size or any(_broke_group(got[r][1]) for r in failed):
                # One rank raised mid-step and the others ran on or lost it: the group may be
                # unusable (every later case would fail with "Connection closed by peer").
                self._restart()
            raise CaseError(failed[0], *got[failed[0]][1])
        return [got[r][1] for r in range(self.world_size)]

    def _restart(self) -> None:
        """A fresh pool in place of one a case may have left unusable."""
        self.close()
        self._start()

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._procs = []
