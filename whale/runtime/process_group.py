"""Joining the job's process group: under torchrun, or as a single process."""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import math
import os
import time

import torch
import torch.distributed as dist

from ..ir.emulation import slowdown_from_env
from .emulate import check_ranks
from .guard.watchdog import start_watchdog

__all__ = ["FLAT_COLLECTIVES", "WorldInfo", "all_gather_flat", "init", "new_group", "reduce_scatter_flat", "require_initialized", "world_info"]

# The flat collectives (one tensor in, one out): newer torch names them ``*_single`` and warns on
# the older names, which torch 2.4 still needs.
FLAT_COLLECTIVES = {
    "all_gather": "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor",
    "reduce_scatter": "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor",
}


def all_gather_flat(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """``output`` = every rank's ``input`` in rank order (this torch's name for it)."""
    return getattr(dist, FLAT_COLLECTIVES["all_gather"])(output, input, group=group, async_op=async_op)


def reduce_scatter_flat(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """``output`` = rank r's slot of the sum of every rank's ``input`` (this torch's name for it)."""
    return getattr(dist, FLAT_COLLECTIVES["reduce_scatter"])(output, input, group=group, async_op=async_op)

# At exit, how long the interpreter lets other threads run before it finalizes (see _at_exit).
_EXIT_GRACE_S = 0.02
_exit_hook: list[bool] = []

# What wh.init gave the default group: torch's new_group() would take its own default
# (30 minutes for gloo) instead, so whale's groups take this one.
_group_timeout: list[datetime.timedelta] = []


@dataclasses.dataclass(frozen=True)
class WorldInfo:
    """Who this process is in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device


def init(
    backend: str | None = None, *, timeout: float = 300.0, step_timeout: float | None = 120.0,
    timeout_s: float | None = None,
) -> WorldInfo:
    """Join the job's default process group (idempotent).

    Under ``torchrun`` the rank and world come from its environment; run as a plain script,
    the process forms a world of one, so the same training script works without a launcher.
    The backend defaults to NCCL when CUDA is available, gloo otherwise.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; None picks by the device.
        timeout: seconds the rendezvous and any one collective or transfer may wait before
            the process group fails it (an error naming what waited, inside a step).
        step_timeout: seconds a step may wait on a peer before the watchdog names the rank,
            the step and the action it waited for, and ends this process (exit code 75) so
            ``torchrun --max-restarts`` can restart the job; None turns the watchdog off.
        timeout_s: the former name of ``timeout``.

    Example::

        info = wh.init(timeout=300, step_timeout=60)
        print(info.rank, info.world_size)
    """
    if timeout_s is not None:
        timeout = timeout_s
    for name, value in (("timeout", timeout), ("step_timeout", step_timeout)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"wh.init({name}={value!r}) must be a number of seconds > 0")
    if step_timeout is not None and not math.isfinite(step_timeout):
        step_timeout = None
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install a build with it")
    # A bad WHALE_EMULATE_SLOWDOWN fails here, before any process group is made.
    spec = slowdown_from_env()
    if spec and "WORLD_SIZE" in os.environ:
        check_ranks(spec, int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        backend = backend or ("nccl" if use_cuda else "gloo")
        if backend not in ("nccl", "gloo", "mpi", "xccl", "ucc"):
            raise ValueError(f"wh.init(backend={backend!r}): use 'nccl' (GPUs) or 'gloo' (CPUs)")
        if use_cuda and backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        delta = datetime.timedelta(seconds=timeout)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=delta)
        else:
            # A world of one needs no rendezvous: an in-memory store serves it.
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=delta
            )
        _group_timeout[:] = [delta]
    start_watchdog(step_timeout if dist.get_world_size() > 1 else None)
    _hook_exit()
    return world_info()


def new_group(ranks: list[int]) -> dist.ProcessGroup:
    """``dist.new_group(ranks)`` with the timeout ``wh.init`` gave the default group (torch's
    own default otherwise). Collective: every rank calls it, in one order."""
    return dist.new_group(list(ranks), timeout=_group_timeout[0] if _group_timeout else None)


def world_info() -> WorldInfo:
    """This process's place in the initialized world."""
    require_initialized("world_info()")
    backend = str(dist.get_backend())
    use_cuda = backend == "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return WorldInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
        backend=backend,
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
    )


def require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs the process group: call wh.init() first (it joins torchrun's group, "
            "or forms a world of one when run as a plain script)"
        )
    _hook_exit()


def _hook_exit() -> None:
    """Register :func:`_at_exit` once, where this process has gloo groups."""
    if not _exit_hook and "gloo" in str(dist.get_backend()):
        atexit.register(_at_exit)
        _exit_hook.append(True)


def _at_exit() -> None:
    """Let gloo's worker threads finish with the GIL before the interpreter finalizes.

    A gloo collective issued during backward (tensor parallel's, the gradient buckets') holds
    a Python object: torch keeps the autograd engine's context in thread-local state while
    backward runs, and each collective takes a copy. Gloo's worker thread often drops the
    last reference to a finished collective, and to destroy it needs the GIL. When the main
    thread reaches interpreter finalization first, as it may right after a job's last step,
    the worker cannot take the GIL, and the process aborts ("terminate called without an active
    exception", exit code -6): about 1 exit in 10 of a 2-rank tensor-parallel job here
    (``tests/test_exit.py``). atexit handlers run before finalization begins; sleeping hands
    the GIL to any such worker.
    """
    time.sleep(_EXIT_GRACE_S)
